#!/usr/bin/env python
"""`damex benchmark {moe,model}` — speed tables measured side by side in one run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

from damex.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["moe"] and "--distributed" in argv:  # expert parallelism, gloo processes
        from damex.moe.parallel_bench import main as parallel_main

        sys.exit(parallel_main([a for a in argv[1:] if a != "--distributed"]))
    sys.exit(main(["benchmark", *argv]))
