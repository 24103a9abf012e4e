"""Developer stack: throwaway servers and a mock upstream for `make run`, tests and benchmarks.

Nothing in ``proxy`` or ``control_plane`` may import this package.
"""
