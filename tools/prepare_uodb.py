#!/usr/bin/env python
"""Rebuild UODB from the original releases; see `--help` and docs/preparing_uodb.md.

python tools/prepare_uodb.py --src ORIGINALS_DIR --out data/uodb [--datasets kitti dota ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

from damex.data.converters.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
