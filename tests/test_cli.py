"""The command line: every command, its exit codes, and what it writes (or does not)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from conftest import TINY, write
from dsl.errors import DlnError



NPZ_PROGRAM = """model from_npz
data { source "train.npz"; split train=0.5 dev=0.25 test=0.25 }
input x: float[3]
output y: class[2]
layers { dense 2 softmax }
train { optimizer sgd lr=0.1; epochs 2 }
"""



def test_check_fmt_and_shapes(tmp_path, dlnc):
    path = write(tmp_path, TINY)
    result = dlnc("check", path)
    assert result.code == 0 and "ok" in result.out
    formatted = dlnc("fmt", path).out
    assert "model tiny" in formatted
    again = write(tmp_path, formatted, "again.dln")
    assert dlnc("check", again).code == 0
    shapes = dlnc("shapes", path).out
    assert "W[1] (8, 4)" in shapes and "hidden.W (8, 4)" in shapes and "b[1] (8, 1)" in shapes
    assert "(8, m)" in shapes and "(N, 8)" in shapes
    assert "67" in shapes                         # 4·8 + 8 + 8·3 + 3 parameters


def test_compile_writes_both_models_that_pass_the_checker(tmp_path, dlnc):
    result = dlnc("compile", write(tmp_path, TINY), "-o", tmp_path / "out")
    assert result.code == 0, result.err
    for name in ("model.onnx", "train_step.onnx"):
        model = onnx.load(str(tmp_path / "out" / name))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 17 and model.ir_version == 8
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    step = onnx.load(str(tmp_path / "out" / "train_step.onnx"))
    inputs = {i.name for i in step.graph.input}
    assert {"lr", "beta1", "beta2", "eps", "step", "hidden.W", "params", "params.v", "x", "y"} <= inputs


def test_training_graph_runs_the_same_in_the_reference_evaluator(tmp_path, dlnc):
    import onnxruntime as ort
    import dsl
    from compiler.program import compile_program, initial_values
    compiled = compile_program(dsl.load(TINY))
    spec = compiled.spec
    rng = np.random.default_rng(0)
    feeds = {spec.x: rng.normal(size=(8, 4)).astype(np.float32), spec.y: np.arange(8, dtype=np.int64) % 3}
    feeds |= initial_values(spec)
    feeds |= {name: np.asarray(v, np.float32) for name, v in spec.hyper.items()}
    session = ort.InferenceSession(compiled.train_step.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    want = ReferenceEvaluator(compiled.train_step).run(None, feeds)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_run_then_predict_from_npy_and_csv(tmp_path, dlnc):
    run = dlnc("run", write(tmp_path, TINY), "-o", tmp_path / "run")
    assert run.code == 0, run.err
    assert "test" in run.out and "accuracy" in run.out
    model = tmp_path / "run" / "model.onnx"
    x = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    out = dlnc("predict", model, tmp_path / "x.npy")
    assert out.code == 0, out.err
    rows = out.out.strip().splitlines()
    assert rows[0].startswith("prediction,p_setosa") and rows[1].startswith("setosa")
    (tmp_path / "x.csv").write_text("a,b,c,d\n5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n")
    assert dlnc("predict", model, tmp_path / "x.csv").out == out.out
    assert dlnc("predict", model, tmp_path / "x.csv", "-o", tmp_path / "p.csv").code == 0
    assert (tmp_path / "p.csv").read_text() == out.out
    info = dlnc("info", model).out
    assert "opsets ai.onnx 17" in info and "dlnc.classes" in info and "x: float32 [N, 4]" in info


def test_predict_rejects_a_wrong_width(tmp_path, dlnc):
    assert dlnc("run", write(tmp_path, TINY), "-o", tmp_path / "run", "--quiet").code == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 5), np.float32))
    result = dlnc("predict", tmp_path / "run" / "model.onnx", tmp_path / "x.npy")
    assert result.code == 2 and "5 values but the model takes 4" in result.err


def test_run_refuses_to_overwrite_without_force(tmp_path, dlnc):
    path = write(tmp_path, TINY)
    assert dlnc("run", path, "-o", tmp_path / "run", "--quiet").code == 0
    again = dlnc("run", path, "-o", tmp_path / "run", "--quiet")
    assert again.code == 2 and "--force" in again.err
    assert dlnc("run", path, "-o", tmp_path / "run", "--quiet", "--force").code == 0


def test_set_overrides_a_param(tmp_path, dlnc):
    text = TINY.replace("model tiny\n", "model tiny\nparam width = 8\n").replace("dense 8 tanh", "dense width tanh")
    path = write(tmp_path, text)
    assert "hidden.W (5, 4)" in dlnc("shapes", path, "--set", "width=5").out
    bad = dlnc("shapes", path, "--set", "widht=5")
    assert bad.code == 2 and "width" in bad.err


def test_early_stopping_restores_the_best_weights(tmp_path, dlnc):
    text = TINY.replace("epochs 20", "epochs 60; early_stopping patience=3 metric=dev_loss").replace("lr=0.05", "lr=0.3")
    result = dlnc("run", write(tmp_path, text), "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda r: r["dev_loss"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["splits"]["dev"]["loss"] == pytest.approx(best["dev_loss"], rel=1e-6)


# ---------------------------------------------------------------- bad data: clear errors, nothing written
def _npz(path: Path, x, y) -> None:
    np.savez(path, x=np.asarray(x), y=np.asarray(y))


BAD_DATA = {
    "nan": (lambda p: _npz(p, np.where(np.arange(30).reshape(10, 3) == 7, np.nan, 1.0), np.arange(10) % 2), "row 2"),
    "label_out_of_range": (lambda p: _npz(p, np.ones((10, 3)), np.arange(10)), "row 2"),
    "lengths": (lambda p: _npz(p, np.ones((10, 3)), np.arange(9) % 2), "10"),
    "width": (lambda p: _npz(p, np.ones((10, 4)), np.arange(10) % 2), "4"),
    "truncated": (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), "train.npz"),
    "object_arrays": (lambda p: np.savez(p, x=np.array([[1, "a", None]] * 10, dtype=object), y=np.arange(10) % 2),
                      "train.npz"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_a_clear_error_and_nothing_is_written(case, tmp_path, dlnc):
    make, expected = BAD_DATA[case]
    make(tmp_path / "train.npz")
    result = dlnc("run", write(tmp_path, NPZ_PROGRAM), "-o", tmp_path / "run")
    assert result.code == 2
    assert "train.npz" in result.err and expected in result.err
    assert "Traceback" not in result.err
    assert not (tmp_path / "run").exists()


def test_a_user_error_never_shows_a_traceback(tmp_path, dlnc):
    result = dlnc("run", write(tmp_path, TINY.replace("tanh", "tahn")), "-o", tmp_path / "run")
    assert result.code == 2
    assert "m.dln:5:" in result.err and "did you mean 'tanh'" in result.err and "Traceback" not in result.err
    assert "^" in result.err


def test_installed_console_script_finds_its_grammar_from_any_folder(tmp_path):
    script = Path(sys.executable).parent / "dlnc"
    if not script.exists():
        pytest.xfail("dlnc is not installed in this environment (run `pip install .` first)")
    path = write(tmp_path, TINY)
    done = subprocess.run([str(script), "check", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    broken = subprocess.run([str(script), "check", str(write(tmp_path, "model x\ninput x: float[64\n", "bad.dln"))],
                            cwd="/", capture_output=True, text=True)
    assert broken.returncode == 2 and "bad.dln:2:" in broken.stderr and "Traceback" not in broken.stderr


def test_cuda_without_the_cuda_provider_falls_back_to_the_cpu_with_a_message(tmp_path, dlnc):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.xfail("this machine has the CUDA provider; the fallback cannot be reached")
    result = dlnc("run", write(tmp_path, TINY), "-o", tmp_path / "run", "--device", "cuda", "--json")
    assert result.code == 0, result.err
    assert "warning: --device cuda" in result.err and "onnxruntime-gpu" in result.err
    assert "training on the CPU instead" in result.err and "Traceback" not in result.err
    assert (tmp_path / "run" / "model.onnx").exists()
    assert json.loads(result.out)["splits"]["train"]["examples"] > 0


def test_cuda_provider_that_does_not_load_falls_back_too(tmp_path, dlnc, monkeypatch):
    """onnxruntime-gpu without its CUDA libraries lists the provider but cannot load it (seen with
    the 1.31.1 wheel on this CPU machine); a session then runs on the CPU provider alone."""
    import onnxruntime as ort
    listed = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    if "CUDAExecutionProvider" in listed:
        pytest.xfail("this machine has the CUDA provider; the fallback cannot be reached")
    result = dlnc("run", write(tmp_path, TINY), "-o", tmp_path / "run", "--device", "cuda")
    assert result.code == 0, result.err
    assert "did not load" in result.err and "training on the CPU instead" in result.err


def test_a_runner_asked_for_cuda_without_the_provider_is_a_clear_error():
    """The library path (StepRunner, the benchmark) does not fall back: it says what is missing."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.xfail("this machine has the CUDA provider; the error path cannot be reached")
    from runtime.session import make_session, resolve_device
    with pytest.raises(DlnError, match="onnxruntime-gpu"):
        make_session(b"", "cuda")
    assert resolve_device("cuda")[0] == "cpu" and resolve_device("cpu") == ("cpu", None)


REFERENCE_EXAMPLES = ["cancer_logistic", "moons_shallow", "digits_deep", "digits_cnn", "digits_transfer",
                      "names_lm", "cats_mismatch"]


@pytest.mark.parametrize("name", REFERENCE_EXAMPLES)
def test_every_example_of_the_language_reference_passes_check(name, dlnc):
    golden = Path(__file__).parent / "golden" / "programs" / f"{name}.dln"
    result = dlnc("check", golden)
    assert result.code == 0, result.err
    assert "ok" in result.out
