#!/usr/bin/env python
"""Write seeded image-level P% subsets of COCO JSONs (docs/design.md §4.7); see `--help`.

python tools/make_subsets.py --root data/uodb --percent 10 --seed 0
python tools/make_subsets.py --json-in train.json --json-out sub.json --percent 10
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

from damex.data.subsets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
