#!/usr/bin/env python
"""`damex visualize-routing` — see `python tools/visualize_routing.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

from damex.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["visualize-routing", *sys.argv[1:]]))
