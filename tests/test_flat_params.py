"""The trainable parameters as one flat vector (`params`) with each parameter's input bound to
its slice: the layout the compiler declares, the binding the runner makes, and what reads and
writes the parameters by name (values, arrays, load)."""
from __future__ import annotations

import numpy as np
from onnx.reference import ReferenceEvaluator

import dsl
from compiler.program import FLAT, compile_program, initial_values
from runtime.session import StepRunner

TEXT = """model flat
input x: float[5]
output y: class[3]
layers {
  dense 6 relu
  dense 4 tanh
  dense 3 softmax
}
train {
  optimizer adam lr=0.05
  batch_size 8
  freeze dense_2
  seed 0
}
"""


def compiled():
    return compile_program(dsl.load(TEXT, "flat.dln"))


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(8, 5)).astype(np.float32), "y": np.arange(8, dtype=np.int64) % 3}


def test_the_flat_layout_covers_every_trainable_parameter_once_in_order():
    spec = compiled().spec
    assert [v.name for v in spec.flat] == list(spec.trainable) == ["dense_1.W", "dense_1.b", "dense_3.W", "dense_3.b"]
    offsets = np.cumsum([0] + [v.size for v in spec.flat])
    assert [v.offset for v in spec.flat] == list(offsets[:-1])
    inits = {p.name: p.init for p in spec.params}
    assert all(v.shape == inits[v.name].shape for v in spec.flat)
    joined = initial_values(spec)[FLAT]
    assert joined.shape == (1, offsets[-1])
    for v in spec.flat:
        np.testing.assert_array_equal(v.of(joined), inits[v.name])
        assert np.shares_memory(v.of(joined), joined)
    # the frozen layer is a plain input, outside the vector and its optimiser state
    assert "dense_2.W" not in spec.updates and FLAT in spec.updates and f"{FLAT}.v" in spec.updates


def test_the_runner_binds_each_parameter_to_its_slice_of_the_flat_buffer():
    c = compiled()
    runner = StepRunner(c, "cpu", 1)
    for k in range(3):
        runner.step(batch(k))
    values = runner.values()
    flat = values[FLAT].numpy()
    for v in c.spec.flat:
        np.testing.assert_array_equal(values[v.name].numpy(), v.of(flat))
    arrays = runner.arrays()
    assert FLAT not in arrays and {v.name for v in c.spec.flat} | {"dense_2.W", f"{FLAT}.s"} <= set(arrays)


def test_a_step_reads_the_parameters_load_wrote():
    """load() writes a parameter into its slice of the flat buffer; the next step's forward pass
    (which reads the shaped input) and its update (which reads the flat one) must both see it:
    the step's loss and new parameters equal onnx.reference's on explicit copies."""
    c = compiled()
    runner = StepRunner(c, "cpu", 1)
    runner.step(batch(0))
    changed = {"dense_1.W": np.full((6, 5), 0.25, np.float32), "dense_3.b": np.array([1.0, -2.0, 0.5], np.float32)}
    runner.load(changed)
    before = runner.arrays()
    feeds = {**before, FLAT: runner.values()[FLAT].numpy(), **batch(1),
             **{k: np.asarray(v, np.float32) for k, v in c.spec.hyper.items()}}
    np.testing.assert_array_equal(feeds["dense_1.W"], changed["dense_1.W"])
    names = [o.name for o in c.train_step.graph.output]
    want = dict(zip(names, ReferenceEvaluator(c.train_step).run(None, feeds)))
    loss = runner.step(batch(1))
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
    np.testing.assert_allclose(runner.values()[FLAT].numpy(), want[f"new.{FLAT}"], rtol=1e-4, atol=1e-6)


def test_arrays_then_load_resumes_the_same_training():
    c = compiled()
    first = StepRunner(c, "cpu", 1)
    for k in range(4):
        first.step(batch(k))
    second = StepRunner(c, "cpu", 1)
    second.load(first.arrays())
    for k in range(4, 7):
        assert first.step(batch(k)) == second.step(batch(k))
    for name, array in first.arrays().items():
        np.testing.assert_array_equal(second.arrays()[name], array, err_msg=name)


def test_values_copy_the_slices_where_the_flat_buffer_cannot_be_viewed():
    """On CUDA no OrtValue can view a slice of device memory, so values() copies the slices out
    of FLAT instead (the branch runs here with the CPU views withheld)."""
    c = compiled()
    runner = StepRunner(c, "cpu", 1)
    runner.step(batch(0))
    viewed = {name: value.numpy().copy() for name, value in runner.values().items()}
    runner._view_values = [{}, {}]
    copied = runner.values()
    assert set(copied) == set(viewed)
    for name, array in viewed.items():
        np.testing.assert_array_equal(copied[name].numpy(), array, err_msg=name)
