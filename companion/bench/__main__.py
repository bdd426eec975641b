"""``python -m companion.bench [--quick] [--json OUT]``."""

from __future__ import annotations

import sys

from companion.bench import main

if __name__ == "__main__":  # pragma: no cover - the command line
    sys.exit(main())
