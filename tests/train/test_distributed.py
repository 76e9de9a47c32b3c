"""Several CPU processes (torchrun, gloo) train exactly like one process with the same global batch.

1 process x micro 4 x accumulation 2 == 2 processes x micro 4 x accumulation 1, under DDP and FSDP2,
for a v1 stage (aligning layer and frozen teacher) and a v2 stage (text weights frozen, their
vision copies training). This holds only if every global step trains on the same 8 records whatever
the world size; the trainer reads one globally shuffled record order and gives rank r every n-th
record of it. Checkpoints are DCP folders: a job killed with SIGKILL resumes from its last complete
checkpoint, on 2 processes or on 1, and a 1-process checkpoint resumes on 2; each ends at the
uninterrupted run's weights. A dead rank stops the whole job quickly, named in the error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eve_vlm
from eve_vlm.train import Recipe, Trainer, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(eve_vlm.__file__).resolve().parents[1]  # the workers import the package this test imported
V1, V2 = "tiny/eve_v1/1_prealign", "tiny/eve_v2/1_vision"
# fp32 on CPU; what differs is only the order of floating-point sums (gradient all-reduce and
# reduce-scatter, the global-norm reduction), a few ulps per step
RTOL, ATOL = 1e-5, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun_cmd(nproc: int, recipe: str, out: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "eve_vlm.cli", "train", recipe, "--set", f"output_dir={out}"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def torchrun(nproc: int, recipe: str, out: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun_cmd(nproc, recipe, out, *overrides, resume=resume), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_process(recipe: str, out: Path, *overrides: str, resume: bool = False) -> Trainer:
    trainer = Trainer.from_recipe(Recipe.load(recipe, [f"output_dir={out}", *overrides]), progress=False)
    trainer.train(resume=resume)
    return trainer


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == steps
    for step, (x, y) in enumerate(zip(la, lb, strict=True), 1):
        assert y == pytest.approx(x, rel=RTOL, abs=ATOL), f"step {step}: {a.name} {x}, {b.name} {y}"
    wa = load_file(str(a / "final/model.safetensors"))
    wb = load_file(str(b / "final/model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [V1, V2])
def test_two_processes_ddp_and_fsdp2_match_one_process(tmp_path: Path, recipe: str) -> None:
    steps = ["max_steps=6", "micro_batch_size=4", "global_batch_size=8"]
    one = tmp_path / "one"
    one_process(recipe, one, *steps)
    for strategy in ("ddp", "fsdp"):
        two = tmp_path / strategy
        torchrun(2, recipe, two, *steps, f"distributed={strategy}")
        assert_same_run(one, two, 6)
        summary = json.loads((two / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["samples"] == 48


def _job_pids(out: Path, rank: int | None = None) -> list[int]:
    """Processes of the job writing to `out` (launcher and workers), or only its worker with
    RANK=`rank` (read from /proc: torchrun passes the rank in each worker's environment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"\0" + f"output_dir={out}".encode() + b"\0" not in cmdline:
            continue
        if rank is None or f"RANK={rank}".encode() in env:
            pids.append(int(entry.name))
    return pids


def _kill_all(out: Path) -> None:
    for pid in _job_pids(out):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int) -> None:
    """Start the job and SIGKILL all its processes as soon as checkpoints/step-`step` is complete."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:  # a pipe nobody reads would fill and block the job
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=log, start_new_session=True)
    marker = out / "checkpoints" / f"step-{step}" / "trainer_state.json"
    deadline = time.monotonic() + 240
    try:
        while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        _kill_all(out)
        proc.wait(timeout=60)
    assert marker.is_file(), (out.parent / f"{out.name}.log").read_text()[-4000:]
    assert not (out / "final").exists(), "the job finished before it was killed"


def _as_a_killed_write_leaves_it(out: Path) -> None:
    """A later checkpoint that was being written when the job died: the hidden temp folder the
    atomic rename never moved, holding part of a DCP folder and no trainer_state.json."""
    latest = latest_checkpoint(out)
    later = int(latest.name.split("-")[1]) + 2
    tmp = out / "checkpoints" / f".step-{later}.tmp"
    shutil.copytree(latest / "dcp", tmp / "dcp", dirs_exist_ok=True)
    next(iter(sorted((tmp / "dcp").iterdir()))).write_bytes(b"half")  # a truncated shard


RUN = ["max_steps=8", "save_every=2", "keep_checkpoints=0", "micro_batch_size=4", "global_batch_size=8",
       "distributed=fsdp"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the resumed ones must end at (1 process)."""
    out = tmp_path_factory.mktemp("whole")
    one_process(V2, out, *RUN)
    return out


@pytest.mark.slow
def test_a_killed_job_resumes_on_2_or_1_processes_at_the_uninterrupted_weights(tmp_path: Path, whole: Path) -> None:
    run = RUN

    killed = tmp_path / "killed"
    _kill_after_checkpoint(_torchrun_cmd(2, V2, killed, *run), killed, 2)
    ckpts = killed / "checkpoints"
    # a write the kill interrupted is a hidden temp folder, never a step folder
    assert all(p.name.startswith(".") or (p / "trainer_state.json").is_file() for p in ckpts.iterdir())
    _as_a_killed_write_leaves_it(killed)
    resumed_from = latest_checkpoint(killed)
    on_one = tmp_path / "killed_on_one"  # the same killed job, resumed on 1 process
    shutil.copytree(killed, on_one)

    proc = torchrun(2, V2, killed, *run, resume=True)
    assert f"resumed from {resumed_from}" in proc.stderr
    assert_same_run(whole, killed, 8)

    one_process(V2, on_one, *run, resume=True)
    assert_same_run(whole, on_one, 8)


@pytest.mark.slow
def test_a_1_process_checkpoint_resumes_on_2_processes_at_the_uninterrupted_weights(tmp_path: Path, whole: Path) -> None:
    run = RUN
    part = tmp_path / "part"
    Trainer.from_recipe(Recipe.load(V2, [f"output_dir={part}", *run]), progress=False).train(stop_after=5)
    assert latest_checkpoint(part).name == "step-4"
    torchrun(2, V2, part, *run, resume=True)
    assert_same_run(whole, part, 8)


def _running_job_and_rank1(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path, Path, int]:
    """A 2-process FSDP2 job that trains until stopped, once its first step is logged: the
    launcher, its output folder, its log and rank 1's pid."""
    out = tmp_path / "run"
    cmd = _torchrun_cmd(2, V2, out, "max_steps=100000", "micro_batch_size=4", "global_batch_size=8",
                        "distributed=fsdp")
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:  # a pipe nobody reads would fill and block the job
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while (not metrics.is_file() or not metrics.read_text().strip()) and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            time.sleep(0.05)
        pids = _job_pids(out, rank=1)
        assert len(pids) == 1, f"workers with RANK=1: {pids}"
    except BaseException:
        _kill_all(out)
        proc.wait()
        raise
    return proc, out, log_path, pids[0]


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_within_60_s_naming_it(tmp_path: Path) -> None:
    proc, out, log_path, rank1 = _running_job_and_rank1(tmp_path, _env())
    try:
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        _kill_all(out)
        proc.wait()
    err = log_path.read_text()
    assert proc.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"
    assert "rank      : 1 (local_rank: 1)" in err and "exitcode  : -9" in err, err[-3000:]


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path: Path) -> None:
    """A rank that stops without dying (SIGSTOP) is not seen by torchrun; the other rank's next
    collective gives up after EVE_DIST_TIMEOUT_S and the job fails instead of waiting forever."""
    proc, out, log_path, rank1 = _running_job_and_rank1(tmp_path, {**_env(), "EVE_DIST_TIMEOUT_S": "10"})
    try:
        os.kill(rank1, signal.SIGSTOP)
        deadline = time.monotonic() + 90
        while ("Timed out waiting 10000ms" not in log_path.read_text() and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.2)
        # Rank 0 gave up (or the job ended otherwise: the assertions below say so). Waking rank 1
        # spares torchrun's 30 s grace period for a stopped process: it then dies of the SIGTERM
        # torchrun sent it, or of its own next collective.
        os.kill(rank1, signal.SIGCONT)
        proc.wait(timeout=60)
    finally:
        _kill_all(out)
        proc.wait()
    err = log_path.read_text()
    assert proc.returncode != 0
    assert "Timed out waiting 10000ms" in err, err[-3000:]


def test_the_collective_timeout_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from eve_vlm.train.distributed import collective_timeout_s

    monkeypatch.delenv("EVE_DIST_TIMEOUT_S", raising=False)
    assert collective_timeout_s() == 600
    monkeypatch.setenv("EVE_DIST_TIMEOUT_S", "45")
    assert collective_timeout_s() == 45
    for bad in ("0", "ten"):
        monkeypatch.setenv("EVE_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="EVE_DIST_TIMEOUT_S must be a positive number of seconds"):
            collective_timeout_s()
