"""Benchmarks of the gateway, run from outside like a client would (``make bench``).

Must not import ``proxy`` or ``control_plane``: what is measured runs in subprocesses.
"""
