#!/usr/bin/env python
"""Speed tables measured side by side in one run.

``moe`` / ``model``: `damex benchmark {moe,model}`; ``moe --distributed``: replicated vs
expert-parallel experts on 2 gloo processes (``damex.moe.parallel_bench``);
``profile -c CONFIG [--image-size S]``: where the time of a training step goes; ``deform``:
deformable attention, reference vs fast;
``infer``: inference images/s (eager vs ``torch.compile``); training iterations/s of several
configs, interleaved: ``profile -c A -c B``; ``onnx [-c CONFIG] [--checkpoint CKPT]``: the
exported ONNX model's latency (onnxruntime) beside PyTorch eager.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout

_OWN = {
    "profile": "damex.engine.step_profile",
    "deform": "damex.modeling.bench",
    "infer": "damex.engine.inference_bench",
    "onnx": "damex.export",
}


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):  # every subcommand, not only damex benchmark's
        print("usage: python tools/benchmark.py {moe,model,profile,deform,infer,onnx} ...")
        print(__doc__)
        print("Each subcommand's options: python tools/benchmark.py SUBCOMMAND --help")
        return 0
    if argv[:1] == ["moe"] and "--distributed" in argv:  # expert parallelism, gloo processes
        from damex.moe.parallel_bench import main as parallel_main

        return int(parallel_main([a for a in argv[1:] if a != "--distributed"]) or 0)
    if argv and argv[0] in _OWN:
        import importlib

        from damex.cli import run_reporting_errors

        module = importlib.import_module(_OWN[argv[0]])
        entry = {
            "deform": "deform_main",
            "infer": "main",
            "onnx": "bench_main",
        }.get(argv[0], "main")
        # a bad config or path: one "damex benchmark NAME: error: ..." line, exit code 2
        return run_reporting_errors(
            f"benchmark {argv[0]}", argv, lambda: int(getattr(module, entry)(argv[1:]) or 0)
        )
    from damex.cli import main

    return main(["benchmark", *argv])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
