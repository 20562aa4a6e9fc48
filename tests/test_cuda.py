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
import pytest
from conftest import EXAMPLES, TINY, write
from model_cases import ALL_CASES, assert_trains_alike, case, first_step, train_feeds, trained

from runtime.session import cuda_problem

PROBLEM = cuda_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"--device cuda: {PROBLEM}")

STEPS = 3


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
    assert_trains_alike(compiled, gpu_losses, gpu_arrays, cpu_losses, cpu_arrays)


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
