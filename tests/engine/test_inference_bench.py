"""``tools/benchmark.py infer``: a real (tiny) model timed end to end."""

from __future__ import annotations

from pathlib import Path

import yaml
from engine_fixtures import tiny_config_dict

from damex.engine.inference_bench import main, run_infer_benchmark


def test_infer_benchmark_times_the_eval_forward(tmp_path: Path, synthetic_root: Path, capsys):
    tiny = tiny_config_dict(synthetic_root, tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    r = run_infer_benchmark(str(path), batch_size=2, repeats=2, image_size=60)
    assert r["image"] == "60x80" and r["batch"] == 2
    assert 0 < r["eager_img_s"] < 1e4
    assert "compiled_img_s" not in r and "compile_error" not in r
    assert main(["-c", str(path), "--repeats", "1", "--image-size", "60"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {path} | 60x80 | 1 |")
