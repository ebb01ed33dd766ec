"""tools/benchmark.py: its help names every subcommand, and every subcommand it names exists."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_tool", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_every_subcommand_and_each_has_its_own_help(capsys) -> None:
    bench = _benchmark_module()
    assert bench._main(["--help"]) == 0
    text = capsys.readouterr().out
    subcommands = ["moe", "model", *bench._OWN]
    for name in subcommands:
        assert f"``{name}" in text  # described in the help text
    for name in subcommands:  # a name in the help that has no entry point fails here
        with pytest.raises(SystemExit) as exc:
            bench._main([name, "--help"])
        assert exc.value.code == 0, name
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["profile", "infer"])
def test_a_missing_config_is_one_error_line_and_exit_code_2(name, capsys, tmp_path) -> None:
    bench = _benchmark_module()
    missing = tmp_path / "nope.yaml"
    assert bench._main([name, "-c", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"damex benchmark {name}: error: config file not found: {missing}"]
