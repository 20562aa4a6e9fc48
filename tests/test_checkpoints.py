"""Checkpoints: what they hold, atomic replacement, bit-identical resume, and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import conftest
from conftest import EXAMPLES, crash_after, with_epochs, write
from runtime import checkpoint
from runtime.files import write_atomic

TINY = with_epochs(conftest.TINY, 12)

# dropout noise, batchnorm buffers, momentum slots, decay and early stopping: all must resume exactly
RICH = """model rich
data { source "digits"; split train=0.6 dev=0.2 test=0.2; train_dev 0.1; normalize }
input x: float[64]
output y: class[10]
layers { dense 32 relu; batchnorm; dropout keep_prob=0.8; dense 10 softmax }
train {
  optimizer momentum lr=0.05 beta=0.9
  lr_decay inverse rate=0.1
  batch_size 64
  epochs 14
  regularize l2 lambda=0.001
  early_stopping patience=4 metric=dev_loss
  seed 7
}
"""



def weights(out: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(out / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("text,stop", [(TINY, 5), (RICH, 3)], ids=["adam", "momentum-dropout-batchnorm-early-stop"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, dlnc, monkeypatch, text, stop, threads):
    program = write(tmp_path, text)
    flags = ("--threads", threads, "--checkpoint-interval", "0", "--quiet")
    assert dlnc("run", program, "-o", tmp_path / "whole", *flags).code == 0
    with monkeypatch.context() as patch:
        crash_after(patch, stop)
        assert dlnc("run", program, "-o", tmp_path / "cut", *flags).code == 130
    assert not (tmp_path / "cut" / "model.onnx").exists()
    resumed = dlnc("run", program, "-o", tmp_path / "cut", "--resume", "--threads", threads, "--json")
    assert resumed.code == 0, resumed.err
    assert json.loads(resumed.out)["resumed_from_epoch"] == stop
    assert (tmp_path / "cut" / "model.onnx").read_bytes() == (tmp_path / "whole" / "model.onnx").read_bytes()
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    for name, array in weights(tmp_path / "whole").items():
        assert np.array_equal(array, weights(tmp_path / "cut")[name])


def test_a_checkpoint_holds_what_a_resume_needs(tmp_path, dlnc):
    program = write(tmp_path, RICH)
    assert dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0", "--quiet").code == 0
    files = sorted(p.name for p in (tmp_path / "run" / checkpoint.FOLDER).iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")   # older ones removed
    found = checkpoint.latest(tmp_path / "run" / checkpoint.FOLDER)
    meta = found.meta
    for key in ("model", "source_sha256", "config_sha256", "data_sha256", "params_sha256", "epoch", "step",
                "rng", "early_stopping", "history", "arrays_sha256"):
        assert key in meta, key
    assert meta["model"] == "rich" and meta["rng"]["shuffle"]["bit_generator"] == "PCG64" and "noise" in meta["rng"]
    assert len(meta["history"]) == meta["epoch"] and meta["step"] > 0
    assert meta["early_stopping"]["has_best_weights"] and meta["early_stopping"]["best_epoch"] >= 1
    assert "dense_1.W" in found.arrays and "params.v" in found.arrays and "step" in found.arrays
    assert "params" not in found.arrays          # the parameters are saved by name, once
    assert any(name.startswith(checkpoint.BEST) for name in found.arrays)
    assert any("running" in name or "mean" in name or "var" in name for name in found.arrays)   # batchnorm
    with np.load(tmp_path / "run" / checkpoint.FOLDER / meta["arrays"], allow_pickle=False) as archive:
        assert set(archive.files) == set(found.arrays)
    assert float(found.arrays["step"]) == meta["step"]


def test_the_previous_checkpoint_stays_until_the_new_one_is_complete(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.float32(3)}
    meta = {"model": "m", "step": 3, "history": []}
    checkpoint.save(folder, 1, arrays, meta)

    def failing(path, data):                      # the JSON that would commit epoch 2 cannot be written
        if str(path).endswith(".json"):
            raise OSError(28, "No space left on device")
        write_atomic(path, data)
    monkeypatch.setattr(checkpoint, "write_atomic", failing)
    with pytest.raises(OSError):
        checkpoint.save(folder, 2, {**arrays, "w": arrays["w"] + 1}, {**meta, "step": 6})
    found = checkpoint.latest(folder)
    assert found.epoch == 1 and found.step == 3 and np.array_equal(found.arrays["w"], arrays["w"])
    checkpoint.clean(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-000001.json", "epoch-000001.npz"]


def test_a_damaged_checkpoint_is_refused(tmp_path, dlnc, monkeypatch):
    program = write(tmp_path, TINY)
    crash_after(monkeypatch, 4)
    assert dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.undo()
    npz = next((tmp_path / "run" / checkpoint.FOLDER).glob("*.npz"))
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    result = dlnc("run", program, "-o", tmp_path / "run", "--resume")
    assert result.code == 2 and "fails its checksum" in result.err and "epoch-000004.npz" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "run" / "model.onnx").exists()
    json_path = next((tmp_path / "run" / checkpoint.FOLDER).glob("*.json"))
    json_path.write_text("{ not json")
    result = dlnc("run", program, "-o", tmp_path / "run", "--resume")
    assert result.code == 2 and "is damaged" in result.err


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace("model tiny", "model other"), "belongs to model 'tiny', not 'other'"),
    (lambda t: t.replace("dense 8 tanh", "dense 8 relu"), "the .dln program has changed"),
    (lambda t: t.replace("dense 8 tanh", "dense 9 tanh"), "the .dln program has changed"),
])
def test_a_checkpoint_of_another_model_or_program_is_refused(tmp_path, dlnc, monkeypatch, change, message):
    program = write(tmp_path, TINY)
    crash_after(monkeypatch, 2)
    assert dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.undo()
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    result = dlnc("run", write(tmp_path, change(TINY), "changed.dln"), "-o", tmp_path / "run", "--resume")
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_other_hyperparameters_are_refused(tmp_path, dlnc, monkeypatch):
    program = write(tmp_path, TINY.replace("model tiny\n", "model tiny\nparam width = 8\n")
                    .replace("dense 8 tanh", "dense width tanh"))
    crash_after(monkeypatch, 2)
    assert dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.undo()
    result = dlnc("run", program, "-o", tmp_path / "run", "--resume", "--set", "width=9")
    assert result.code == 2 and "--set" in result.err


def test_resume_of_a_finished_run_gives_the_same_model(tmp_path, dlnc):
    program = write(tmp_path, TINY)
    assert dlnc("run", program, "-o", tmp_path / "run", "--quiet").code == 0
    model = (tmp_path / "run" / "model.onnx").read_bytes()
    again = dlnc("run", program, "-o", tmp_path / "run", "--resume", "--json")
    assert again.code == 0 and json.loads(again.out)["resumed_from_epoch"] == 12
    assert (tmp_path / "run" / "model.onnx").read_bytes() == model


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path, dlnc):
    (tmp_path / "run").mkdir()
    result = dlnc("run", write(tmp_path, TINY), "-o", tmp_path / "run", "--resume")
    assert result.code == 0 and "starting from the beginning" in result.err


@pytest.mark.parametrize("args,message", [
    (("--resume",), "--resume needs the run folder"),
    (("-o", "missing", "--resume"), "no run to resume"),
    (("-o", "run", "--resume", "--force"), "pass one of them"),
    (("-o", "run", "--checkpoint-interval", "-1"), "--checkpoint-interval"),
])
def test_resume_options_that_cannot_work(tmp_path, dlnc, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = dlnc("run", write(tmp_path, TINY), *args)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "missing").exists()


def test_force_starts_over(tmp_path, dlnc, monkeypatch):
    program = write(tmp_path, TINY)
    crash_after(monkeypatch, 3)
    assert dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.undo()
    refused = dlnc("run", program, "-o", tmp_path / "run")
    assert refused.code == 2 and "--force" in refused.err and "--resume" in refused.err
    result = dlnc("run", program, "-o", tmp_path / "run", "--force", "--json")
    assert result.code == 0 and json.loads(result.out)["resumed_from_epoch"] == 0


def test_digits_example_resumes_exactly(tmp_path, dlnc, monkeypatch):
    text = with_epochs((EXAMPLES / "digits_deep.dln").read_text(), 6)
    program = write(tmp_path, text)
    assert dlnc("run", program, "-o", tmp_path / "whole", "--quiet").code == 0
    crash_after(monkeypatch, 2)
    assert dlnc("run", program, "-o", tmp_path / "cut", "--checkpoint-interval", "0", "--quiet").code == 130
    monkeypatch.undo()
    assert dlnc("run", program, "-o", tmp_path / "cut", "--resume", "--quiet").code == 0
    assert (tmp_path / "cut" / "model.onnx").read_bytes() == (tmp_path / "whole" / "model.onnx").read_bytes()
