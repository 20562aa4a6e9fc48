"""Faults: SIGKILL at random moments (during checkpoint writes too), a full disk, a read-only
run folder. After each, the newest checkpoint is complete and verified, the step count never
goes backwards, `--resume` goes on from it, and the final weights are bit-identical to an
uninterrupted run. A full disk or a read-only folder is a clear error (exit 2, no traceback)
that leaves the last checkpoint intact and no temporary file behind.

The killed runs are real subprocesses (`python -m runtime.cli run ... --threads 1`);
`DLNC_TEST_WRITE_DELAY` makes every atomic write pause half-way, so that kills land inside
checkpoint writes often. The whole file runs in well under a minute on two cores.
"""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import crash_after
from runtime import checkpoint

ROOT = Path(__file__).resolve().parent.parent
KILLS = 22
WRITE_DELAY = "0.03"

PROGRAM = """model faulty
data { source "d.npz"; split train=0.7 dev=0.15 test=0.15; normalize }
input x: float[6]
output y: class[3]
layers { dense 16 relu; dropout keep_prob=0.9; dense 3 softmax }
train { optimizer adam lr=0.01; batch_size 16; epochs EPOCHS; seed 5 }
"""


def make_program(folder: Path, epochs: int) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    y = (np.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1)).astype(np.int64)
    np.savez(folder / "d.npz", x=x, y=y)
    path = folder / "m.dln"
    path.write_text(PROGRAM.replace("EPOCHS", str(epochs)))
    return path


def command(program: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "run", str(program), "-o", str(out), "--threads", "1",
            "--checkpoint-interval", "0", *extra]


def environment(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "DLNC_DEBUG": "", **extra}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def newest_step(out: Path, last: int) -> int:
    """The newest complete checkpoint is readable and verified, and its step is not behind."""
    found = checkpoint.latest(out / checkpoint.FOLDER)
    if found is None:
        assert last == 0, "a checkpoint disappeared"
        return 0
    assert found.step >= last, f"step went backwards: {found.step} < {last}"
    assert found.meta["history"][-1]["epoch"] == found.epoch
    metrics = out / "metrics.jsonl"
    if metrics.exists():                              # written atomically: always whole lines
        for line in metrics.read_text().splitlines():
            json.loads(line)
    return found.step


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, dlnc):
    program = make_program(tmp_path, epochs=40)
    reference = tmp_path / "reference"
    assert dlnc("run", program, "-o", reference, "--threads", "1", "--checkpoint-interval", "0",
                "--quiet").code == 0

    out = tmp_path / "killed"
    rng = random.Random(1234)
    last_step, kills, during_writes, resumes_verified = 0, 0, 0, 0
    env = environment(DLNC_TEST_WRITE_DELAY=WRITE_DELAY)
    first = True
    while kills < KILLS:
        expected_epoch = (checkpoint.latest(out / checkpoint.FOLDER) or None)
        expected_epoch = expected_epoch.epoch if expected_epoch is not None else None
        log = tmp_path / f"stderr-{kills}.txt"
        with open(log, "wb") as err:
            proc = subprocess.Popen(command(program, out, *([] if first else ["--resume"])), cwd=tmp_path,
                                    env=env, stdout=subprocess.DEVNULL, stderr=err)
        first = False
        folder = out / checkpoint.FOLDER
        stale = set(temporaries(out))                 # left by the previous kill, until this run cleans up
        deadline = time.monotonic() + 20
        if kills % 2 == 0:
            # wait for a new checkpoint write to be under way, then kill inside it
            while proc.poll() is None and time.monotonic() < deadline:
                if folder.is_dir() and set(temporaries(folder)) - stale:
                    time.sleep(rng.uniform(0, 0.02))
                    break
                time.sleep(0.002)
        else:
            # a random moment once the run has loaded (it says where it starts from)
            while proc.poll() is None and time.monotonic() < deadline and \
                    not any(word in log.read_text(errors="replace") for word in ("resuming", "epoch/s")):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:                   # it finished before the kill: nothing to count
            assert proc.returncode == 0, log.read_text()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if temporaries(out) or any(not (folder / f"{npz.stem}.json").exists() for npz in folder.glob("*.npz")):
            during_writes += 1
        last_step = newest_step(out, last_step)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text
        if expected_epoch is not None and f"from epoch {expected_epoch} " in text:
            resumes_verified += 1

    done = subprocess.run(command(program, out, "--resume", "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    newest_step(out, last_step)
    assert not temporaries(out)
    assert (out / "model.onnx").read_bytes() == (reference / "model.onnx").read_bytes()
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    report = json.loads((out / "report.json").read_text())
    print(f"\nfault test: {kills} kills, {during_writes} during checkpoint writes, "
          f"{resumes_verified} resumes verified, final step {report['steps']}, final weights bit-identical")
    assert kills >= 20 and during_writes >= 5 and resumes_verified >= 10


def interrupted_run(tmp_path: Path, dlnc, monkeypatch, epochs: int = 8, stop_after: int = 3) -> tuple[Path, Path]:
    """A run folder whose run stopped (like a crash) right after the checkpoint of `stop_after`."""
    from runtime import run
    program = make_program(tmp_path, epochs=epochs)
    out = tmp_path / "run"
    original = crash_after(monkeypatch, stop_after)
    assert dlnc("run", program, "-o", out, "--threads", "1", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.setattr(run.Checkpointer, "__call__", original)
    assert checkpoint.latest(out / checkpoint.FOLDER).epoch == stop_after
    return program, out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path, dlnc, monkeypatch):
    program, out = interrupted_run(tmp_path, dlnc, monkeypatch)
    npz = next((out / checkpoint.FOLDER).glob("*.npz"))
    before = snapshot(out)
    # every file larger than this fails to grow: the next checkpoint's arrays do not fit
    done = subprocess.run(command(program, out, "--resume", "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, preexec_fn=limited(npz.stat().st_size - 1))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "cannot write" in done.stderr
    assert "disk is full or a file-size limit" in done.stderr and "epoch 3" in done.stderr
    assert not temporaries(out)
    assert snapshot(out) == before                    # the checkpoint of epoch 3, intact
    assert checkpoint.latest(out / checkpoint.FOLDER).epoch == 3

    # checkpoints fit, the final curves.png does not: still exit 2, the final checkpoint kept
    done = subprocess.run(command(program, out, "--resume", "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, preexec_fn=limited(npz.stat().st_size + 4096))
    assert done.returncode == 2 and "curves.png" in done.stderr and "Traceback" not in done.stderr
    assert not temporaries(out)
    assert checkpoint.latest(out / checkpoint.FOLDER).epoch == 8
    assert not (out / "model.onnx").exists()

    done = subprocess.run(command(program, out, "--resume", "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reference = tmp_path / "reference"
    assert dlnc("run", program, "-o", reference, "--threads", "1", "--quiet").code == 0
    assert (out / "model.onnx").read_bytes() == (reference / "model.onnx").read_bytes()


def test_a_full_disk_before_the_first_checkpoint_leaves_no_temporary_file(tmp_path):
    program = make_program(tmp_path, epochs=3)
    out = tmp_path / "run"
    done = subprocess.run(command(program, out, "--quiet"), cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, preexec_fn=limited(200))
    assert done.returncode == 2 and "config.json" in done.stderr and "no checkpoint had been written" in done.stderr
    assert "Traceback" not in done.stderr
    assert not temporaries(out) and not list(out.glob("*"))


def drop_write_override():
    """For root, who may write anywhere: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set before exec, so the child obeys file permissions. None for other users."""
    if os.geteuid() != 0:
        return None
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:          # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return drop


def test_a_read_only_run_folder_is_a_clear_error(tmp_path, dlnc, monkeypatch):
    program, out = interrupted_run(tmp_path, dlnc, monkeypatch)
    before = snapshot(out)
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    folders = (out / checkpoint.FOLDER, out)
    try:
        for folder in folders:
            os.chmod(folder, read_only)
        done = subprocess.run(command(program, out, "--resume", "--quiet"), cwd=tmp_path, env=environment(),
                              capture_output=True, text=True, preexec_fn=drop_write_override())
    finally:
        for folder in folders:
            os.chmod(folder, 0o755)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "read-only" in done.stderr and "epoch 3" in done.stderr
    assert snapshot(out) == before and not temporaries(out)
    assert checkpoint.latest(out / checkpoint.FOLDER).epoch == 3
