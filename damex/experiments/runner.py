"""Run an experiment spec: each (seed, variant) as ``damex train`` + ``damex evaluate`` processes.

Each run is the public command line, not the trainer's internals, so what the tables report is
what a user gets from ``damex train``. For one run (``OUT/runs/<variant>/seed<seed>``):

1. ``damex train -c CONFIG <spec overrides> <variant overrides> train.seed=S train.max_iters=N
   train.time_budget_min=0 [train.schedule=cosine] output.dir=RUN output.overwrite=true`` (an
   iteration budget replaces a ``time_cosine`` schedule by the iteration cosine; the routing
   report of a MoE model is written to ``RUN/routing``);
2. the metrics of each of ``eval_splits``: the config's own ``data.test_split`` (``test``) is read
   from the training run's final evaluation (``RUN/eval/results.json``, no second pass); any
   other split (``val``) is a ``damex evaluate`` of ``RUN/last.pth`` with
   ``data.test_split=<split>``, into ``RUN/eval_<split>`` (results + detections);
3. one JSON line appended to ``OUT/results.jsonl``: identity (variant, seed, config hash, git
   commit), budget, iterations, training seconds and iteration rate, per-dataset COCO AP / AP50
   (and UODB's VOC AP50 where the evaluation reports it) per split, and the order-independent
   routing metrics of the test split (``damex.moe.stats``).

Runs go one after another, or ``parallel`` at a time (``threads`` sets the subprocesses'
``OMP_NUM_THREADS``). A run is finished when its line is in ``results.jsonl``: a resumed runner
skips it, and so does another spec with the same output folder, variant name, seed and resolved
config (shared baselines run once). A run that was cut short (killed runner) leaves no line and
starts again from scratch. Runs go seed-major (seed 0 of every variant, then seed 1, ...), so a
spec stopped halfway still compares the variants on the same seeds. ``OUT/runner.lock`` holds
the runner's pid: a second runner on the same folder is refused while the first is alive.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from damex.config import Config, config_to_dict, load_config
from damex.errors import ConfigError, DamexError
from damex.experiments.spec import ExperimentSpec, Variant
from damex.experiments.summary import write_summary

__all__ = [
    "PlannedRun",
    "RunFailed",
    "plan_runs",
    "run_experiments",
    "read_results",
    "collect_run",
]

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
FAILURES = "failures.jsonl"
_LOCK = "runner.lock"


class RunFailed(DamexError, RuntimeError):
    """A training or evaluation subprocess of a run exited with an error."""


@dataclass(frozen=True)
class PlannedRun:
    """One (variant, seed) run of a spec.

    Attributes:
        variant: the variant.
        seed: ``train.seed``.
        run_dir: ``OUT/runs/<variant>/seed<seed>``.
        overrides: every ``key=value`` given to ``damex train`` (spec, variant, budget, seed,
            output), in that order (later wins).
        config_hash: sha256 (12 hex) of the resolved config's differences from the schema
            defaults, without ``output`` and ``train.seed``: equal for the seeds of one variant,
            changed by any edit that changes what is trained (a resumed spec re-runs an edited
            variant), not by a new config field left at its default.
    """

    variant: Variant
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    config_hash: str
    train_split: str = "test"

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed{self.seed}/{self.config_hash}"

    def train_command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "damex.cli", "train", "-c", str(self.variant.config), *self.overrides]

    def eval_command(self, split: str, python: str = sys.executable) -> list[str]:
        return [
            python,
            "-m",
            "damex.cli",
            "evaluate",
            "-c",
            str(self.variant.config),
            "--checkpoint",
            str(self.run_dir / "last.pth"),
            "--out",
            str(self.run_dir / f"eval_{split}"),
            *self.overrides,
            f"data.test_split={split}",
        ]


def _budget_overrides(spec: ExperimentSpec, schedule: str, log_every: int) -> list[str]:
    b = spec.budget
    if b.minutes > 0:
        return [f"train.time_budget_min={b.minutes}", f"train.max_iters={b.iterations}"]
    out = [f"train.max_iters={b.iterations}", "train.time_budget_min=0"]
    if schedule == "time_cosine":  # a clock schedule without a clock budget: the same cosine
        out.append("train.schedule=cosine")  # over the iterations
    # the last training record must be the last iteration: its 'time' is the training time
    out.append(f"train.log_every={math.gcd(b.iterations, max(log_every, 1))}")
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def config_hash(resolved: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """sha256 (12 hex digits) of a resolved config without ``output.*`` and ``train.seed``.

    Args:
        resolved: the run's resolved config as a dict.
        defaults: the schema's default config as a dict; if given, only the values that differ
            from it are hashed, so a field added to the schema later (at its default) does not
            change the hash of an existing run.
    """
    flat = _flatten(json.loads(json.dumps(resolved, default=str)))
    base = _flatten(json.loads(json.dumps(defaults, default=str))) if defaults else {}
    data = {
        k: v
        for k, v in flat.items()
        if not k.startswith("output.") and k != "train.seed" and (k not in base or base[k] != v)
    }
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def plan_runs(spec: ExperimentSpec) -> list[PlannedRun]:
    """Every run of ``spec``, seed-major; configs are loaded and validated here (errors early)."""
    defaults = config_to_dict(Config())

    runs: list[PlannedRun] = []
    for seed in spec.seeds:
        for variant in spec.variants:
            user = [*spec.overrides, *variant.overrides]
            try:
                cfg = load_config(variant.config, user)
            except DamexError as err:
                raise ConfigError(f"{spec.source}: variant {variant.name!r}: {err}") from None
            run_dir = spec.output / "runs" / variant.name / f"seed{seed}"
            overrides = (
                *user,
                *_budget_overrides(spec, cfg.train.schedule, cfg.train.log_every),
                f"train.seed={seed}",
                f"output.dir={run_dir}",
                "output.overwrite=true",
                "output.tensorboard=false",
            )
            full = load_config(variant.config, list(overrides))
            runs.append(
                PlannedRun(
                    variant,
                    seed,
                    run_dir,
                    overrides,
                    config_hash(config_to_dict(full), defaults),
                    train_split=full.data.test_split,
                )
            )
    return runs


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl``; a torn last line (killed mid-write) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                logger.warning("%s: skipping the torn last line %d (%s)", p, i + 1, err)
                continue
            raise ConfigError(f"{p}, line {i + 1}: not JSON: {err}") from None
    return out


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write (after a torn line, start a new line first)."""
    data = json.dumps(record, sort_keys=True) + "\n"
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = "\n" + data
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_state() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _subprocess(cmd: list[str], log: Path, what: str, env: dict[str, str]) -> float:
    """Run ``cmd`` with stdout+stderr to ``log``; returns its wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RunFailed(f"{what} exited with {rc} (log {log}):\n" + "\n".join(tail))
    return wall


def _split_metrics(results_json: Path) -> dict[str, Any]:
    data = json.loads(results_json.read_text(encoding="utf-8"))
    datasets = {}
    for name, m in data["datasets"].items():
        entry = {
            "AP": m["ap"],
            "AP50": m["ap50"],
            "foreign_share": m.get("foreign_share"),
            "num_images": m.get("num_images"),
        }
        if "voc_ap50" in m:
            entry["VOC_AP50"] = m["voc_ap50"]
        datasets[name] = entry
    mean = {"AP": data["mean"]["AP"], "AP50": data["mean"]["AP50"]}
    if "VOC_AP50" in data["mean"]:
        mean["VOC_AP50"] = data["mean"]["VOC_AP50"]
    return {"mean": mean, "datasets": datasets}


def routing_record(routing_stats_json: Path) -> dict[str, Any]:
    """Order-independent routing metrics per MoE layer from a routing report's summary."""
    # local: both import torch, which the runner process (and `damex experiments --help`)
    # otherwise never loads
    from damex.evaluation.routing import routing_accuracy
    from damex.moe.stats import order_free_routing

    data = json.loads(routing_stats_json.read_text(encoding="utf-8"))
    names = list(data["datasets"])
    emap = dict(data.get("expert_map") or {})
    layers = []
    for layer in data["layers"]:
        free = order_free_routing(layer["counts"])
        acc = routing_accuracy(layer["counts"], [emap.get(n) for n in names]) if emap else None
        vals = [a for a in (acc or []) if a is not None]
        layers.append(
            {
                "name": layer["name"],
                "counts": layer["counts"],
                "map_accuracy": sum(vals) / len(vals) if vals else None,
                **free.to_dict(),
            }
        )

    def _mean(key: str) -> float | None:
        vals = [la[key] for la in layers if la[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "datasets": names,
        "expert_map": emap,
        "tokens": data.get("tokens"),
        "layers": layers,
        "map_accuracy": _mean("map_accuracy"),
        "best_accuracy": _mean("best_accuracy"),
        "nmi": _mean("nmi"),
        "mean_routing_entropy": _mean("mean_routing_entropy"),
        "min_active_experts": min(la["active_experts"] for la in layers) if layers else None,
    }


def _train_timing(run_dir: Path) -> dict[str, Any]:
    """Iterations and training seconds from the run's ``metrics.jsonl``."""
    iters, train_s, stop_iter = 0, None, None
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("type") == "train":
            iters, train_s = int(rec["iter"]), float(rec["time"])
        elif rec.get("type") == "eval" and rec.get("final"):
            stop_iter = int(rec["iter"])
    if train_s is None:
        raise RunFailed(f"{path}: no training record")
    return {
        "iterations": stop_iter if stop_iter is not None else iters,
        "train_s": train_s,
        "it_s": iters / train_s if train_s > 0 else None,
    }


def collect_run(
    spec: ExperimentSpec,
    run: PlannedRun,
    walls: dict[str, float],
    split_results: dict[str, Path],
) -> dict[str, Any]:
    """The ``results.jsonl`` record of a finished run (reads its files).

    Args:
        spec: the spec.
        run: the run.
        walls: wall seconds of its subprocesses.
        split_results: split -> the ``results.json`` of its evaluation.
    """
    rec: dict[str, Any] = {
        "spec": spec.name,
        "variant": run.variant.name,
        "seed": run.seed,
        "config_hash": run.config_hash,
        "key": run.key,
        "config": str(run.variant.config),
        "overrides": list(run.overrides),
        "budget": {"iterations": spec.budget.iterations, "minutes": spec.budget.minutes},
        "run_dir": str(run.run_dir),
        **_git_state(),
        **_train_timing(run.run_dir),
        "wall_s": walls,
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "metrics": {s: _split_metrics(path) for s, path in split_results.items()},
    }
    stats = run.run_dir / "routing" / "routing_stats.json"
    rec["routing"] = routing_record(stats) if stats.is_file() else None
    return rec


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(out: Path) -> Path:
    lock = out / _LOCK
    if lock.is_file():
        try:
            pid = int(lock.read_text().split()[0])
        except (ValueError, IndexError):
            pid = -1
        if pid > 0 and pid != os.getpid() and _pid_alive(pid):
            raise ConfigError(
                f"another experiment runner (pid {pid}) is using {out}; stop it first "
                f"(or delete {lock} if that pid is not a runner)"
            )
    lock.write_text(f"{os.getpid()}\n")
    return lock


def _execute_run(
    spec: ExperimentSpec, run: PlannedRun, python: str, env: dict[str, str]
) -> dict[str, Any]:
    """Train and evaluate one run from scratch; returns its record (raises on failure)."""
    if run.run_dir.exists():  # a run cut short: start it again from scratch
        shutil.rmtree(run.run_dir)
    run.run_dir.mkdir(parents=True)
    load0 = os.getloadavg()[0]
    walls = {
        "train": _subprocess(
            run.train_command(python), run.run_dir / "train.log", f"train {run.key}", env
        )
    }
    split_results = {}
    for s in spec.eval_splits:
        final = run.run_dir / "eval" / "results.json"  # the trainer's final eval
        if s == run.train_split and final.is_file():
            split_results[s] = final
            continue
        walls[f"eval_{s}"] = _subprocess(
            run.eval_command(s, python),
            run.run_dir / f"eval_{s}.log",
            f"evaluate {run.key} on {s}",
            env,
        )
        split_results[s] = run.run_dir / f"eval_{s}" / "results.json"
    record = collect_run(spec, run, walls, split_results)
    record["load_avg_1min"] = [load0, os.getloadavg()[0]]
    return record


def _select_runs(spec: ExperimentSpec, only: list[str] | None) -> list[PlannedRun]:
    """The spec's planned runs, only those of the ``only`` variants when given."""
    runs = plan_runs(spec)
    if only:
        unknown = sorted(set(only) - {v.name for v in spec.variants})
        if unknown:
            raise ConfigError(f"--only: unknown variant(s) {unknown}")
        runs = [r for r in runs if r.variant.name in only]
    return runs


def _print_commands(spec: ExperimentSpec, todo: list[PlannedRun], python: str) -> None:
    """``--dry-run``: the train command of every run and the evaluate command of other splits."""
    for r in todo:
        print(" ".join(r.train_command(python)))
        for s in spec.eval_splits:
            if s != r.train_split:
                print(" ".join(r.eval_command(s, python)))


def _subprocess_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class _ResultWriter:
    """Records a finished run, one thread at a time.

    A record becomes a line of ``results.jsonl`` (then the summary is rewritten), a failure a
    line of ``failures.jsonl``.

    Attributes:
        spec: the experiment spec.
        keys: the run keys the summary covers.
        parallel, threads: stored in every record (they change the measured iteration rate).
    """

    spec: ExperimentSpec
    keys: set[str]
    parallel: int
    threads: int | None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self, run: PlannedRun, record: dict[str, Any] | None, err: Exception | None
    ) -> None:
        out = self.spec.output
        results_path = out / RESULTS
        with self._lock:
            if err is not None:
                logger.error("run %s failed: %s", run.key, err)
                _append_line(
                    out / FAILURES,
                    {
                        "key": run.key,
                        "error": str(err),
                        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    },
                )
                return
            assert record is not None
            record["parallel"], record["threads"] = self.parallel, self.threads
            _append_line(results_path, record)
            split = "test" if "test" in record["metrics"] else self.spec.eval_splits[-1]
            logger.info(
                "%s: %s AP50 %.3f, %d iterations in %.0f s",
                run.key,
                split,
                record["metrics"][split]["mean"]["AP50"],
                record["iterations"],
                record["train_s"],
            )
            write_summary(self.spec, read_results(results_path), keys=self.keys)


def run_experiments(
    spec: ExperimentSpec,
    *,
    max_runs: int | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
    parallel: int = 1,
    threads: int | None = None,
    python: str = sys.executable,
) -> list[dict[str, Any]]:
    """Run the spec's unfinished runs, then write the summary.

    Args:
        spec: the experiment spec.
        max_runs: stop after this many new runs (run a long spec in pieces).
        only: run only these variants (the summary still covers all finished runs).
        dry_run: print the commands of the unfinished runs, run nothing.
        parallel: runs at the same time (in plan order: with ``parallel`` = the number of
            variants, the variants of one seed train side by side, under the same machine load,
            so their iteration rates compare directly).
        threads: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` of the subprocesses (None: inherit).
        python: interpreter for the ``damex`` subprocesses.

    Returns:
        All records of ``results.jsonl`` (finished runs of this and earlier invocations).
    """
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")
    runs = _select_runs(spec, only)
    keys = {r.key for r in runs}
    out = spec.output
    results_path = out / RESULTS
    done = {r.get("key") for r in read_results(results_path)}
    todo = [r for r in runs if r.key not in done]
    if max_runs is not None:
        todo = todo[: max(max_runs, 0)]
    logger.info(
        "experiment %s: %d runs, %d finished, %d to run now -> %s",
        spec.name,
        len(runs),
        len(runs) - len([r for r in runs if r.key not in done]),
        len(todo),
        out,
    )
    if dry_run:
        _print_commands(spec, todo, python)
        return read_results(results_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{spec.name}.spec.yaml").write_text(
        yaml.safe_dump(_spec_record(spec), sort_keys=False), encoding="utf-8"
    )
    env = _subprocess_env(threads)
    lock = _take_lock(out)
    finish = _ResultWriter(spec=spec, keys=keys, parallel=parallel, threads=threads)

    def work(n: int, run: PlannedRun) -> None:
        logger.info("[%d/%d] %s", n + 1, len(todo), run.key)
        try:
            record = _execute_run(spec, run, python, env)
        except (RunFailed, OSError, KeyError, ValueError) as err:
            finish(run, None, err)
        else:
            finish(run, record, None)

    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for future in [pool.submit(work, n, run) for n, run in enumerate(todo)]:
                future.result()
    finally:
        lock.unlink(missing_ok=True)
    records = read_results(results_path)
    write_summary(spec, records, keys=keys)
    return records


def _spec_record(spec: ExperimentSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "output": str(spec.output),
        "baseline": spec.baseline,
        "seeds": list(spec.seeds),
        "budget": {"iterations": spec.budget.iterations, "minutes": spec.budget.minutes},
        "eval_splits": list(spec.eval_splits),
        "overrides": list(spec.overrides),
        "variants": [
            {"name": v.name, "config": str(v.config), "overrides": list(v.overrides)}
            for v in spec.variants
        ],
    }
