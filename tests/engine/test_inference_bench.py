"""``tools/benchmark.py infer``: a real (tiny) model timed end to end."""

from __future__ import annotations

from pathlib import Path

import yaml

from damex.engine.inference_bench import main, run_infer_benchmark

_TINY = {
    "data": {"train": ["syn_photo", "syn_signs"], "test": ["syn_photo"], "test_scale": 48},
    "model": {
        "backbone": {"name": "resnet18", "frozen_stages": 4},
        "d_model": 32,
        "nheads": 2,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 64,
        "num_queries": 10,
        "num_feature_levels": 3,
        "enc_n_points": 2,
        "dec_n_points": 2,
        "decoder_ffn": ["moe", "dense"],
    },
    "moe": {"num_experts": 2, "expert_map": {"syn_photo": 0, "syn_signs": 1}},
    "train": {"device": "cpu"},
    "eval": {"num_select": 20},
}


def test_infer_benchmark_times_the_eval_forward(tmp_path: Path, synthetic_root: Path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_TINY))
    over = [f"data.synthetic.root={synthetic_root}", "data.synthetic.scale=0.05"]
    over.append("data.synthetic.image_size=96")
    r = run_infer_benchmark(str(path), over, batch_size=2, repeats=2, image_size=60)
    assert r["image"] == "60x80" and r["batch"] == 2
    assert 0 < r["eager_img_s"] < 1e4
    assert "compiled_img_s" not in r and "compile_error" not in r
    assert main(["-c", str(path), "--repeats", "1", "--image-size", "60", *over]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {path} | 60x80 | 1 |")
