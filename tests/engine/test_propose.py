"""damex propose-map and moe.expert_map: auto (a dataset -> expert map from the data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from engine_fixtures import tiny_config_dict

from damex.cli import main
from damex.config import config_from_dict, load_config
from damex.engine.propose import propose_expert_map, resolve_auto_expert_map

SIX = ["syn_photo", "syn_clipart", "syn_aerial", "syn_signs", "syn_faces", "syn_medical"]


def _cfg(synthetic_root: Path, tmp_path: Path, experts: int, expert_map):
    d = tiny_config_dict(synthetic_root, tmp_path / "run")
    d["data"]["train"] = list(SIX)
    d["moe"]["num_experts"] = experts
    d["moe"]["expert_map"] = expert_map
    return config_from_dict(d)


def test_auto_map_is_resolved_deterministically(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synthetic_root, tmp_path, 3, "auto")
    resolved = resolve_auto_expert_map(cfg)
    mapping = dict(resolved.moe.expert_map)
    assert set(mapping) == set(SIX) and set(mapping.values()) == {0, 1, 2}  # no empty expert
    assert resolve_auto_expert_map(cfg).moe.expert_map == resolved.moe.expert_map
    explicit = _cfg(synthetic_root, tmp_path, 3, {n: i % 3 for i, n in enumerate(SIX)})
    assert resolve_auto_expert_map(explicit) is explicit  # only "auto" is touched
    # enough experts: every dataset alone
    six = propose_expert_map(_cfg(synthetic_root, tmp_path, 6, "auto"), images_per_dataset=4)
    assert sorted(six.mapping.values()) == list(range(6))
    # the report shows statistics, distances and clusters
    text = six.report()
    assert "gradient mean" in text and "distances" in text and "expert 5:" in text


def test_propose_map_cli_writes_a_loadable_map(
    synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    cfg = tmp_path / "cfg.yaml"
    d = tiny_config_dict(synthetic_root, tmp_path / "run")
    d["data"]["train"] = list(SIX)
    d["moe"]["num_experts"] = 2
    d["moe"]["expert_map"] = "auto"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "map.yaml"
    code = main(
        ["propose-map", "-c", str(cfg), "--num-experts", "2", "--images", "4", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "clusters:" in printed and "expert 1:" in printed
    proposal = yaml.safe_load(out.read_text())["moe"]
    assert proposal["num_experts"] == 2 and set(proposal["expert_map"]) == set(SIX)
    # the YAML is a valid override of the config
    loaded = load_config(cfg, [f"moe.expert_map={proposal['expert_map']}"])
    assert dict(loaded.moe.expert_map) == proposal["expert_map"]
    with pytest.raises(SystemExit):
        main(["propose-map", "--help"])
    assert "share an expert only when" in capsys.readouterr().out


def test_an_auto_map_run_trains_reports_and_evaluates_with_its_saved_map(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The routing report after training and `damex evaluate` of the run's config (still
    'auto') use the map the run computed and saved, not a fresh proposal (they used to fail)."""
    import torch

    cfg_file = tmp_path / "auto.yaml"
    d = tiny_config_dict(synthetic_root, tmp_path / "run", epochs=1)
    d["data"]["train"] = ["syn_photo", "syn_signs", "syn_faces"]
    d["moe"]["num_experts"] = 2
    d["moe"]["expert_map"] = "auto"
    d["eval"]["report_images"] = 0
    cfg_file.write_text(yaml.safe_dump(d))
    assert main(["train", "-c", str(cfg_file)]) == 0
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=False)["expert_map"]
    assert set(saved) == {"syn_photo", "syn_signs", "syn_faces"}
    routing = (tmp_path / "run" / "routing" / "routing.md").read_text()
    assert all(name in routing for name in saved)
    out = tmp_path / "eval"
    args = ["evaluate", "-c", str(cfg_file), "--checkpoint", str(tmp_path / "run" / "last.pth")]
    assert main([*args, "--out", str(out)]) == 0
    assert (out / "results.json").is_file()
