"""Config loading: inheritance, overrides, and the error messages users see."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from damex.config import (
    Config,
    config_from_dict,
    config_to_dict,
    default_config_path,
    load_config,
    save_config,
    with_overrides,
)
from damex.data.uodb import UODB_CLASSES, UODB_NUM_SLOTS
from damex.errors import ConfigError
from damex.modeling import build_model
from damex.modeling.criterion import build_criterion

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_inheritance_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "data:\n  train: [a, b]\ntrain:\n  lr: 1.0e-3\n  epochs: 3\n")
    child = _write(tmp_path / "sub" / "child.yaml", "_base_: ../base.yaml\ntrain:\n  epochs: 5\n")
    cfg = load_config(child, ["train.batch_size=4", "data.scales=[64, 96]", "train.lr=2e-4"])
    assert cfg.data.train == ["a", "b"]  # from the base
    assert cfg.train.epochs == 5  # child wins over base
    assert cfg.train.batch_size == 4  # override
    assert cfg.data.scales == [64, 96]
    assert cfg.train.lr == pytest.approx(2e-4)  # "2e-4" (a YAML string) converted to float
    assert cfg.model.d_model == 256  # schema default


def test_misspelt_key_names_it_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\nmodel:\n  dec_layer: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"c\.yaml: unknown key 'model\.dec_layer'; did you mean "
        r"'model\.dec_layers'\?",
    ):
        load_config(path)


def test_misspelt_override_names_command_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\n")
    with pytest.raises(ConfigError, match=r"command line: unknown key 'train\.learning_rate'"):
        load_config(path, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(path, ["train.lr"])


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\ntrain:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"invalid value for 'train\.epochs'.*many"):
        load_config(path)


def test_out_of_range_and_choices(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\n")
    with pytest.raises(ConfigError, match=r"'moe\.drop_path' must be in \[0, 1\), got 1\.5"):
        load_config(path, ["moe.drop_path=1.5"])
    with pytest.raises(
        ConfigError,
        match=r"'data\.sampler' must be one of .* got 'unifrom' "
        r"\(did you mean 'uniform'\?\)",
    ):
        load_config(path, ["data.sampler=unifrom"])
    with pytest.raises(ConfigError, match=r"'train\.batch_size' must be > 0, got 0"):
        load_config(path, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"'model\.decoder_ffn' must have one entry per decoder"):
        load_config(path, ["model.dec_layers=2"])
    with pytest.raises(ConfigError, match=r"divisible by model\.nheads"):
        load_config(path, ["model.d_model=100"])


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def _moe_cfg(tmp_path: Path, extra: str) -> Path:
    text = (
        "data:\n  train: [a, b, c]\nmodel:\n  dec_layers: 2\n  decoder_ffn: [moe, dense]\n"
        "moe:\n  num_experts: 2\n" + extra
    )
    return _write(tmp_path / "m.yaml", text)


def test_expert_map_validation(tmp_path: Path) -> None:
    ok = load_config(_moe_cfg(tmp_path, "  expert_map: {a: 0, b: 1, c: 1}\n"))
    assert ok.moe.expert_map == {"a": 0, "b": 1, "c": 1}  # datasets may share an expert
    with pytest.raises(ConfigError, match=r"training dataset 'c' has no expert"):
        load_config(_moe_cfg(tmp_path, "  expert_map: {a: 0, b: 1}\n"))
    with pytest.raises(ConfigError, match=r"'moe\.expert_map\.b' = 2 is out of range"):
        load_config(_moe_cfg(tmp_path, "  expert_map: {a: 0, b: 2, c: 1}\n"))
    with pytest.raises(
        ConfigError, match=r"m\.yaml: 'moe\.expert_map\.syn_phot': dataset 'syn_phot' is neither"
    ):
        load_config(_moe_cfg(tmp_path, "  expert_map: {a: 0, b: 1, c: 1, syn_phot: 0}\n"))
    typo = "data:\n  train: [syn_photo, b]\nmoe:\n  expert_map: {syn_photo: 0, b: 1, syn_phot: 0}\n"
    with pytest.raises(ConfigError, match=r"'syn_phot' is neither .*; did you mean 'syn_photo'\?"):
        load_config(_write(tmp_path / "typo.yaml", typo))
    with pytest.raises(ConfigError, match=r"'moe\.expert_map\.b' must be an expert id .* 'x'"):
        load_config(_moe_cfg(tmp_path, "  expert_map: {a: 0, b: x, c: 1}\n"))
    # the balance-loss baseline needs no map
    load_config(_moe_cfg(tmp_path, "  loss: switch\n"))


def test_round_trip_through_saved_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\n")
    cfg = load_config(path, ["moe.num_experts=4", "data.limited={a: 10}"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_shipped_config_loads() -> None:
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert default_config_path() in paths
    for path in paths:
        if path.parent.name in ("base", "experiments"):
            continue  # bases are partial (no datasets); experiments are run specs
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_every_shipped_config_builds_its_model() -> None:
    """`python -c` construction of every config: the model, criterion and postprocess build."""
    built: dict[str, int] = {}  # configs with the same model share one build (CPU time)
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if path.parent.name in ("base", "experiments"):
            continue
        cfg = load_config(path)
        if path.parent.name == "uodb":  # the paper's 178-way head (docs/design.md §4.2)
            names = [n for n in cfg.data.train if n != "voc12"]
            num_classes = sum(UODB_NUM_SLOTS.get(n, len(UODB_CLASSES[n])) for n in names)
            assert num_classes == 178
        else:
            num_classes = 18  # the six synthetic datasets, disjoint
        build_criterion(cfg, num_classes)
        as_dict = config_to_dict(cfg)
        key = repr((as_dict["model"], as_dict["moe"], num_classes))
        if key not in built:
            model = build_model(cfg.model, cfg.moe, num_classes)
            built[key] = sum(1 for n, _ in model.named_modules() if n.endswith("experts"))
        moe_layers = sum(kind == "moe" for kind in cfg.model.decoder_ffn)
        assert built[key] == moe_layers, path


def test_expert_parallel_loads_and_is_a_boolean(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  train: [a]\n")
    assert load_config(path, ["moe.expert_parallel=true"]).moe.expert_parallel is True
    with pytest.raises(ConfigError, match=r"moe\.expert_parallel"):
        load_config(path, ["moe.expert_parallel=maybe"])
    with pytest.raises(ConfigError, match=r"'train\.amp' fp16 does not work with moe\.expert"):
        load_config(path, ["moe.expert_parallel=true", "train.amp=fp16"])


def test_stale_expert_map_entry_names_the_file_that_set_it(tmp_path: Path) -> None:
    _write(
        tmp_path / "base.yaml",
        "data:\n  train: [a, b]\nmodel:\n  dec_layers: 2\n  decoder_ffn: [moe, dense]\n"
        "moe:\n  num_experts: 2\n  expert_map: {a: 0, b: 1}\n",
    )
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\ndata:\n  train: [a]\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: 'moe\.expert_map\.b': dataset 'b'"):
        load_config(child)
    load_config(child, ["data.test=[a, b]"])  # evaluated on b: its expert scores routing


def test_replace_an_inherited_expert_map(tmp_path: Path) -> None:
    """Issue 11: a config on damex_small with its own 4-dataset map, replacing the base's."""
    own = (
        "data:\n  train: [d1, d2, d3, d4]\n  test: [d1, d2, d3, d4]\n"
        "moe:\n  num_experts: 4\n  expert_map: {d1: 0, d2: 1, d3: 2, d4: 3}\n"
    )
    base = default_config_path()
    merged = _write(tmp_path / "merged.yaml", f"_base_: {base}\n{own}")
    with pytest.raises(ConfigError, match=rf"{base.name}: 'moe\.expert_map\.syn_photo'"):
        load_config(merged)  # merged with the six syn_* entries, which nothing trains
    path = _write(tmp_path / "own.yaml", f"_base_: {base}\n_replace_: [moe.expert_map]\n{own}")
    cfg = load_config(path)
    assert cfg.moe.expert_map == {"d1": 0, "d2": 1, "d3": 2, "d4": 3}
    assert cfg.model.decoder_ffn == ["moe", "dense", "moe"]  # the rest is still inherited
    again = load_config(save_config(cfg, tmp_path / "run" / "config.yaml"))
    assert again == cfg


def test_replace_a_dataset_table_and_its_errors(tmp_path: Path) -> None:
    _write(
        tmp_path / "base.yaml",
        "data:\n  train: [a]\n  datasets:\n    a: {image_root: x, splits: {train: a.json}}\n"
        "    b: {image_root: y, splits: {train: b.json}}\n",
    )
    merged = _write(
        tmp_path / "m.yaml", "_base_: base.yaml\ndata:\n  datasets:\n    c: {image_root: z}\n"
    )
    assert list(load_config(merged).data.datasets) == ["a", "b", "c"]
    replaced = _write(tmp_path / "r.yaml", "_base_: base.yaml\n_replace_: data.datasets\n"
                      "data:\n  datasets:\n    c: {image_root: z}\n")  # fmt: skip
    cfg = load_config(replaced)
    assert list(cfg.data.datasets) == ["c"] and cfg.data.datasets["c"].image_root == "z"
    bad = _write(tmp_path / "bad.yaml", "_base_: base.yaml\n_replace_: [data.dataset]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'data\.dataset'; did you mean"):
        load_config(bad)
    unset = _write(tmp_path / "unset.yaml", "_base_: base.yaml\n_replace_: [moe.expert_map]\n")
    with pytest.raises(ConfigError, match=r"unset\.yaml: _replace_ names 'moe\.expert_map', wh"):
        load_config(unset)
    # on the command line too: the README's example on the 12-dataset UODB recipe
    args = ["data.train=[coco, voc07, kitti]", "data.test=[coco, voc07, kitti]"]
    mapping = "moe.expert_map={coco: 0, voc07: 0, kitti: 1}"
    with pytest.raises(ConfigError, match=r"damex_r50\.yaml: 'moe\.expert_map\.clipart'"):
        load_config(REPO / "configs/uodb/damex_r50.yaml", [*args, mapping])
    cfg = load_config(
        REPO / "configs/uodb/damex_r50.yaml", [*args, mapping, "_replace_=[moe.expert_map]"]
    )
    assert cfg.moe.expert_map == {"coco": 0, "voc07": 0, "kitti": 1}


def test_value_errors_name_the_file_that_set_the_value(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "data:\n  train: [a]\ntrain:\n  batch_size: 0\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: 'train\.batch_size' must be > 0, got 0"):
        load_config(child)
    with pytest.raises(ConfigError, match=r"^command line: 'train\.batch_size' must be > 0"):
        load_config(child, ["train.batch_size=-1"])
    with pytest.raises(ConfigError, match=r"child\.yaml: invalid value for 'data\.scales\[1\]'"):
        load_config(_write(tmp_path / "child.yaml", "_base_: base.yaml\ndata:\n  scales: [1, x]\n"))


def test_expert_map_auto_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(_moe_cfg(tmp_path, "  expert_map: auto\n"))
    assert cfg.moe.expert_map == "auto"
    with pytest.raises(ConfigError, match=r"'moe\.expert_map' must be a mapping .* got 'atuo'"):
        load_config(_moe_cfg(tmp_path, "  expert_map: atuo\n"))


def test_loaded_config_is_read_only_and_overrides_are_validated(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "c.yaml", "data:\n  train: [a, b]\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    changed = with_overrides(cfg, ["train.lr=0.5", "data.limited={b: 50}"])
    assert changed.train.lr == 0.5 and changed.data.limited == {"b": 50.0}
    assert cfg.train.lr != 0.5  # the original is untouched
    with pytest.raises(ConfigError, match=r"'data\.limited\.c' is not a training dataset"):
        with_overrides(cfg, ["data.limited={c: 50}"])
    with pytest.raises(ConfigError, match=r"'moe\.router' must be one of \['linear', 'cosine'\]"):
        with_overrides(cfg, ["moe.router=cosin"])
