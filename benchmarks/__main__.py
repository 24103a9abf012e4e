"""``python -m benchmarks``: the benchmark suite (see ``benchmarks/suite.py``).

Must not import ``proxy`` or ``control_plane``.
"""

import sys

from benchmarks.suite import main

sys.exit(main())
