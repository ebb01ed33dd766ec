"""The MoE throughput benchmark runs and formats (tiny sizes; timings are not checked)."""

from __future__ import annotations

from damex.moe.bench import format_moe_table, run_moe_benchmark


def test_benchmark_rows_and_table() -> None:
    rows = run_moe_benchmark(
        tokens=(40,),
        experts=(0, 2),
        capacity_factors=(0.0, 1.0),
        d_model=8,
        hidden=16,
        repeats=2,
        warmup=0,
        tokens_per_image=20,
    )
    assert [(r["experts"], r["capacity_factor"]) for r in rows] == [(0, None), (2, 0.0), (2, 1.0)]
    assert rows[0]["ratio_to_dense"] == 1.0
    assert rows[1]["kept_fraction"] == 1.0
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    table = format_moe_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| T | E | cf |") and len(lines) == 2 + len(rows)
    assert "| 40 | dense |" in lines[2]
