#!/usr/bin/env python
"""Run a multi-seed experiment spec (resumable); the same as `damex experiments`, see `--help`.

python tools/run_experiments.py -c configs/experiments/full_mixture.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

from damex.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
