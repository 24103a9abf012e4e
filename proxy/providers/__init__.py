"""One module per upstream API format (OpenAI, Anthropic, Gemini) behind one interface.

``base`` holds the interface (``Wire``) and the neutral request/reply/stream forms that
translation goes through; ``registry`` maps a catalog provider ``kind`` to its wire and
builds the translating stream between any two of them. The hot path talks to these
only; it never branches on a provider. No I/O here.
"""
