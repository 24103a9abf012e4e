"""What the proxy and the control plane both speak: the metadata event and its codec,
the API-key format, Redis names and pricing arithmetic.

Pure code: stdlib and orjson only, no I/O. Must not import proxy or control_plane.
"""
