"""The CUDA path (`--device cuda`): the training step on the GPU against the same step on the
CPU, and `dlnc run` end to end. They need ONNX Runtime's CUDA provider (onnxruntime-gpu and a
GPU), which CI's machines lack, so there they are skipped; bench/gpu/device.sh runs them on the
device machine.

The GPU sums in other orders than the CPU, so values agree to float32 rounding, not bit for
bit. Adam divides each gradient element by its own magnitude: an element that is zero up to
rounding can step by ±lr on one device and ∓lr on the other, so the parameters after a few
steps are compared element by element with room for a few such elements."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import EXAMPLES, TINY, write
from model_cases import ALL_CASES, case, train_feeds, trained

from runtime.session import cuda_problem, make_session

PROBLEM = cuda_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"--device cuda: {PROBLEM}")

STEPS = 3


def first_step(compiled, device: str) -> tuple[float, np.ndarray]:
    """The compiled training step run once as it is, with its joined gradient as an extra
    output: the cost and the gradient of every trainable parameter, in FLAT's order."""
    spec, model = compiled.spec, onnx.ModelProto()
    model.CopyFrom(compiled.train_step)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(spec.gradient))
    session = make_session(model.SerializeToString(), device, 1)
    if device == "cuda":
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    feeds = train_feeds(compiled)
    loss, gradient = session.run([spec.loss, spec.gradient], {i.name: feeds[i.name] for i in session.get_inputs()})
    return float(loss), gradient.reshape(-1)


def rounding_sized(compiled) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The elements whose first gradient is zero but for rounding (|g| ≤ 1e-5 max |g|), over
    FLAT and per trainable parameter. A ReLU unit that is active on every row of the batch and
    then batch-normalised has no effect on the cost, so its bias's gradient is such a residue;
    Adam's first step there is ±lr by the residue's sign, which each device rounds its own way."""
    _, gradient = first_step(compiled, "cpu")
    tiny = np.abs(gradient) <= 1e-5 * np.abs(gradient).max()
    return tiny, {v.name: v.of(tiny.reshape(1, -1)) for v in compiled.spec.flat}


@pytest.mark.parametrize("spec", ALL_CASES)
def test_a_step_on_the_gpu_computes_the_cost_and_gradient_of_the_cpu(spec):
    compiled = case(spec).compiled
    cpu_loss, expected = first_step(compiled, "cpu")
    gpu_loss, got = first_step(compiled, "cuda")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4, abs=1e-6)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("spec", ALL_CASES)
def test_training_on_the_gpu_follows_the_cpu(spec):
    compiled = case(spec).compiled
    _, cpu_losses, cpu_arrays = trained(compiled, STEPS)
    gpu, gpu_losses, gpu_arrays = trained(compiled, STEPS, device="cuda")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-3, atol=1e-5)
    assert gpu_arrays.keys() == cpu_arrays.keys()
    flat_tiny, tiny = rounding_sized(compiled)
    for name, expected in cpu_arrays.items():
        got = gpu_arrays[name]
        assert got.shape == expected.shape and np.isfinite(got).all(), name
        free = tiny.get(name, flat_tiny.reshape(got.shape) if got.size == flat_tiny.size else False)
        close = np.isclose(got, expected, rtol=1e-3, atol=1e-5) | free
        # beyond those, one element may take a later rounding-sized gradient the other way
        assert (~close).sum() <= max(1, close.size // 100), f"{name}: {(~close).sum()} of {close.size} differ"


def test_loading_values_on_the_gpu_restores_them():
    compiled = case("example:digits_deep").compiled
    runner, _, before = trained(compiled, 2, device="cuda")
    feeds = train_feeds(compiled, seed=9)
    runner.step({compiled.spec.x: feeds[compiled.spec.x], compiled.spec.y: feeds[compiled.spec.y]})
    moved = runner.arrays()
    assert any(not np.array_equal(moved[n], before[n]) for n in before)
    runner.load(before)
    after = runner.arrays()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_dlnc_run_on_cuda_trains_on_the_gpu_as_on_the_cpu(tmp_path, dlnc):
    path = write(tmp_path, TINY)
    gpu = dlnc("run", path, "-o", tmp_path / "gpu", "--device", "cuda", "--json")
    assert gpu.code == 0, gpu.err
    assert "warning" not in gpu.err and "Traceback" not in gpu.err
    cpu = dlnc("run", path, "-o", tmp_path / "cpu", "--json")
    assert cpu.code == 0, cpu.err
    on_gpu, on_cpu = json.loads(gpu.out), json.loads(cpu.out)
    for split in ("train", "test"):
        assert on_gpu["splits"][split]["error"] == pytest.approx(on_cpu["splits"][split]["error"], abs=0.05)
    assert (tmp_path / "gpu" / "model.onnx").exists()


def test_dlnc_run_on_cuda_trains_and_scores_a_recurrent_model(tmp_path, dlnc):
    # evaluation runs ONNX's own GRU op (cuDNN's, on the GPU); training runs the unrolled cells
    names = (EXAMPLES / "names.txt").read_text().splitlines()[:400]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    text = (EXAMPLES / "names_lm.dln").read_text().replace("epochs 20", "epochs 2").replace("gru 128", "gru 32")
    path = write(tmp_path, text, "names_lm.dln")
    results = {}
    for device in ("cuda", "cpu"):
        result = dlnc("run", path, "-o", tmp_path / device, "--device", device, "--json")
        assert result.code == 0, result.err
        assert "warning" not in result.err and "Traceback" not in result.err
        results[device] = json.loads(result.out)
    for split in ("train", "dev"):
        assert results["cuda"]["splits"][split]["loss"] == pytest.approx(results["cpu"]["splits"][split]["loss"], rel=1e-2)
