"""kill -9 at five random points of a short CPU training run; the resumed run must log the same
losses and end with the same weights as the uninterrupted run (``fault_reference_run``).

The training processes are forked from one "zygote" process that has imported torch and damex
once (and has run no torch op, so no thread pool is forked); each fork is a real training
process that receives a real SIGKILL. Kill points: four at a random delay (0-0.1 s, under one
iteration on an idle machine) after a checkpoint write, one while ``last.pth`` is being written
(its temporary file exists). The seed is ``DAMEX_FAULT_SEED`` (default 0) and is printed in every
failure message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fault_setup import FAULT_EPOCHS, fault_config_dict

from damex.engine.checkpoint import load_checkpoint, verify_checkpoint_file
from damex.engine.logging import read_jsonl

SEED = int(os.environ.get("DAMEX_FAULT_SEED", "0"))
NUM_KILLS = 5
_TIMEOUT_S = 300

_ZYGOTE = r"""
import json, os, sys, traceback
import torch
import damex.engine.trainer as trainer
from damex.config import config_from_dict
torch.set_num_threads(int(sys.argv[1]))  # the test process's: the same float reductions
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 2)
            trainer.train(config_from_dict(job["config"]), resume=job["resume"])
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _losses(run: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k in ("iter", "lr") or k.startswith("loss")}
        for r in read_jsonl(run / "metrics.jsonl")
        if r["type"] == "train"
    ]


class _Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, str(torch.get_num_threads())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _read(self, key: str) -> int:
        while True:
            line = self.proc.stdout.readline()
            assert line, f"zygote died (exit {self.proc.poll()})"
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in msg:
                return int(msg[key])

    def start(self, job: dict[str, Any]) -> int:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read("pid")

    def wait(self) -> int:
        return self._read("exit")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _checkpoint_stamp(last: Path) -> tuple[int, int] | None:
    try:
        st = last.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _kill(pid: int, when: str) -> str:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # the run ended (after its last checkpoint) before the kill
        return "too late: the run had finished"
    return when


def _wait_and_kill(pid: int, out: Path, kind: str, delay: float, where: str) -> str:
    """Kill ``pid`` after its next checkpoint write (+ ``delay``) or during one; returns when."""
    last = out / "last.pth"
    start = _checkpoint_stamp(last)
    # a temporary file left by an earlier kill is not a write in progress (the next save removes it)
    stale = set(out.glob(".last.pth.*.tmp"))
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        writing = kind == "during_write" and start is not None
        if writing and set(out.glob(".last.pth.*.tmp")) - stale:
            return _kill(pid, "during a last.pth write")
        stamp = _checkpoint_stamp(last)
        if stamp is not None and stamp != start:
            if kind == "during_write":  # the write was too quick to catch: kill right after
                return _kill(pid, "right after a last.pth write")
            time.sleep(delay)
            return _kill(pid, f"{delay:.2f} s after a last.pth write")
        time.sleep(0.001)
    raise AssertionError(f"{where}: no checkpoint within {_TIMEOUT_S} s")


def test_kill9_at_five_random_points_then_resume_equals_uninterrupted(
    fault_synthetic_root: Path, fault_reference_run: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    kinds = ["after_write"] * (NUM_KILLS - 1) + ["during_write"]
    rng.shuffle(kinds)
    out = tmp_path / "run"
    config = fault_config_dict(fault_synthetic_root, out)
    zygote = _Zygote()
    history: list[str] = []
    try:
        for k, kind in enumerate(kinds):
            where = f"seed {SEED}, kill {k + 1}/{NUM_KILLS} ({kind}); so far: {history}"
            job = {"config": config, "resume": k > 0, "log": str(tmp_path / f"child{k}.log")}
            pid = zygote.start(job)
            when = _wait_and_kill(pid, out, kind, rng.uniform(0.0, 0.1), where)
            code = zygote.wait()
            log_file = tmp_path / f"child{k}.log"
            log = log_file.read_text()[-3000:] if log_file.exists() else "(no log written)"
            verify_checkpoint_file(out / "last.pth")  # never a damaged last.pth
            it = load_checkpoint(out / "last.pth")["trainer"]["iteration"]
            if code == 0 and it == FAULT_EPOCHS:  # a fast machine finished after its last write
                history.append(f"finished before kill {k + 1} landed")
                break
            assert code == -signal.SIGKILL, f"{where}: exit {code}, not killed\n{log}"
            history.append(f"killed {when}, last.pth at iteration {it}")
        else:
            job = {"config": config, "resume": True, "log": str(tmp_path / "final.log")}
            zygote.start(job)
            code = zygote.wait()
            assert code == 0, (history, (tmp_path / "final.log").read_text()[-3000:])
    finally:
        zygote.close()
    assert sum("during a last.pth write" in h for h in history) <= 1
    assert sum(h.startswith("killed") for h in history) >= NUM_KILLS - 1, history
    got, want = _losses(out), _losses(fault_reference_run)
    assert [r["iter"] for r in got] == list(range(1, FAULT_EPOCHS + 1)), history
    assert got == want, (SEED, history)
    a, b = load_checkpoint(out / "last.pth"), load_checkpoint(fault_reference_run / "last.pth")
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), (key, history)
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint file was left behind"
