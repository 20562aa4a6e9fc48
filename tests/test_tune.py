"""Babysitting (the notes' panda approach): graph inputs changed while `dlnc run` trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dsl
from runtime.cli import compile_with_data, load_data
from runtime.control import ControlFile, parse_control
from runtime.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TEXT = """model babysit
data { source "digits"; split train=0.8 dev=0.2; normalize }
input x: float[64]
output y: class[10]
layers { dense 16 relu; dropout keep_prob=0.9; dense 10 softmax }
train { optimizer sgd lr=0.05; batch_size 32; epochs 5; regularize l2 lambda=0.001; seed 2 }
"""


def compiled_for(text: str):
    program = dsl.load(text, "babysit.dln")
    splits = load_data(program)
    return compile_with_data(program, splits), splits


def test_steps_after_a_change_use_the_new_learning_rate():
    """Training 2 epochs at lr 0.05, then 3 at lr 0.003 through the control hook, ends bit for bit
    where 2 epochs at 0.05 then a restart of the same state at lr 0.003 ends: every step after
    the change used the new value, and none before it did."""
    compiled, splits = compiled_for(TEXT)
    seen = []

    def control(epoch, current):
        seen.append((epoch, current["lr"]))
        return {"lr": 0.003} if epoch == 2 else {}
    changed = train(compiled, splits, threads=1, control=control)
    assert [r.changes for r in changed.history] == [{}, {}, {"lr": 0.003}, {}, {}]
    assert [r.lr for r in changed.history] == pytest.approx([0.05, 0.05, 0.003, 0.003, 0.003])
    assert seen[2] == (2, pytest.approx(0.05)) and seen[3] == (3, pytest.approx(0.003))

    snapshots = []
    train(compiled, splits, threads=1, on_checkpoint=snapshots.append)
    at_two = snapshots[1]
    slower, _ = compiled_for(TEXT.replace("lr=0.05", "lr=0.003"))
    restarted = train(slower, splits, threads=1, resume=at_two)
    for name, array in changed.weights.items():
        np.testing.assert_array_equal(array, restarted.weights[name], err_msg=name)
    unchanged = train(compiled, splits, threads=1)
    assert any(not np.array_equal(unchanged.weights[n], changed.weights[n]) for n in changed.weights)


def test_a_resumed_run_keeps_the_changes_made_before_its_checkpoint():
    compiled, splits = compiled_for(TEXT)
    snapshots = []
    whole = train(compiled, splits, threads=1, on_checkpoint=snapshots.append,
                  control=lambda epoch, current: {"lr": 0.01, "dropout_2.keep_prob": 1.0} if epoch == 1 else {})
    resumed = train(compiled, splits, threads=1, resume=snapshots[2])
    assert resumed.history[-1].lr == pytest.approx(0.01)
    for name, array in whole.weights.items():
        np.testing.assert_array_equal(array, resumed.weights[name], err_msg=name)


def test_control_file_reads_valid_values_and_reports_bad_ones(tmp_path):
    said = []
    control = ControlFile(tmp_path, {"lr": 0.05, "lambda": 0.001, "epoch": 0.0, "dropout_2.keep_prob": 0.9},
                          say=said.append)
    assert control(0, {"lr": 0.05}) == {}                              # no file: nothing changes
    (tmp_path / "control.json").write_text('{"lr": 0.01, "lamda": 2, "epoch": 3, "dropout_2.keep_prob": 1.5}')
    assert control(1, {"lr": 0.05, "lambda": 0.001, "dropout_2.keep_prob": 0.9}) == {"lr": 0.01}
    assert any("did you mean 'lambda'" in s for s in said) and any("keep probability" in s for s in said)
    assert any("'epoch' is not a graph input" in s for s in said)
    said.clear()
    assert control(2, {"lr": 0.01}) == {} and not said                 # the same file again: no repeats
    (tmp_path / "control.json").write_text('{"lr": 0.0')                 # half-saved by an editor
    assert control(3, {"lr": 0.01}) == {} and "not valid JSON" in said[0]
    assert parse_control("[1, 2]", {"lr": 1.0})[1][0].startswith("control.json must hold a JSON object")


def test_dlnc_tune_errors(tmp_path, dlnc):
    result = dlnc("tune", tmp_path / "nothing", "--set", "lr=0.1")
    assert result.code == 2 and "not a run folder" in result.err
    run = tmp_path / "run"
    path = tmp_path / "m.dln"
    path.write_text(TEXT.replace("epochs 5", "epochs 1"))
    assert dlnc("run", path, "-o", run, "--quiet").code == 0
    result = dlnc("tune", run, "--set", "lr=fast")
    assert result.code == 2 and "lr takes a number" in result.err
    result = dlnc("tune", run, "--set", "beta1=0.9")
    assert result.code == 2 and "not a graph input" in result.err and "dropout_2.keep_prob, lambda, lr" in result.err
    result = dlnc("tune", run, "--set", "dropout_2.keep_prob=0")
    assert result.code == 2 and "0 < dropout_2.keep_prob ≤ 1" in result.err
    assert not (run / "control.json").exists()
    listing = dlnc("tune", run)
    assert listing.code == 0 and "lr" in listing.out and "0.05" in listing.out
    done = dlnc("tune", run, "--set", "lr=0.2")
    assert done.code == 0 and "has finished" in done.out
    assert json.loads((run / "control.json").read_text()) == {"lr": 0.2}


def test_dlnc_tune_changes_a_running_dlnc_run(tmp_path):
    """The whole loop: dlnc run trains in another process; dlnc tune writes control.json; the
    run picks it up at its next epoch, logs it in metrics.jsonl and marks it on curves.png."""
    path = tmp_path / "m.dln"
    path.write_text(TEXT.replace("batch_size 32", "batch_size 1").replace("epochs 5", "epochs 400"))
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "runtime.cli"]
    process = subprocess.Popen(command + ["run", str(path), "-o", str(run), "--quiet", "--threads", "1"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.05)
        before = len(metrics.read_text().splitlines())
        tuned = subprocess.run(command + ["tune", str(run), "--set", "lr=0.001", "--set", "dropout_2.keep_prob=1"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert tuned.returncode == 0, tuned.stderr
        assert "applies them at the start of the next epoch" in tuned.stdout
        while time.monotonic() < deadline:
            lines = [json.loads(line) for line in metrics.read_text().splitlines()]
            changed = [i for i, line in enumerate(lines) if "changes" in line]
            if changed and len(lines) >= changed[0] + 3:              # two epochs after the change
                break
            time.sleep(0.05)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    changed = [i for i, line in enumerate(lines) if "changes" in line]
    assert len(changed) == 1, lines
    first = changed[0]
    assert lines[first]["changes"] == {"lr": 0.001, "dropout_2.keep_prob": 1.0}
    assert first + 1 >= before                                     # at the next epoch, not before the request
    assert all(line["lr"] == pytest.approx(0.05) for line in lines[:first])
    assert all(line["lr"] == pytest.approx(0.001) for line in lines[first:])
    assert f"epoch {first + 1}: lr 0.05 → 0.001" in stderr
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_mark_the_changes():
    from runtime.plots import curves_png
    from runtime.trainer import EpochRecord, SplitMetrics
    history = [EpochRecord(e, 0.1 if e < 3 else 0.01, 1.0 / e, {"train": SplitMetrics(1.0 / e, 0.1, 10)},
                           {"lr": 0.01} if e == 3 else {}) for e in range(1, 6)]
    assert curves_png(history, "marked")[:4] == b"\x89PNG"
