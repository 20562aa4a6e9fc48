"""Gradients written in place (`compiler.gradients_in_place`): the runner's step binds each
gradient output to its slice of the buffer the update reads, in place of the Concat that joins
them. The rewritten graph must be valid ONNX, order every read of that buffer after every
gradient (also after ONNX Runtime's own optimisations), and train bit for bit as the step does."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_cases import ALL_CASES, case, trained

import dsl
import runtime.session
from compiler.gradients_in_place import GRADS, gradients_in_place
from compiler.onnx_graph import producers, reads
from compiler.program import compile_program
from runtime.session import StepRunner, session_options


def ancestors(graph: onnx.GraphProto, value: str) -> set[str]:
    """Every value that `value` is computed from, in `graph`."""
    producer, seen, stack = producers(graph), set(), [value]
    while stack:
        node = producer.get(stack.pop())
        if node is not None:
            new = reads(node) - seen
            seen |= new
            stack.extend(new)
    return seen


@pytest.mark.parametrize("spec", ALL_CASES)
def test_every_joined_gradient_is_written_in_place(spec):
    compiled = case(spec).compiled
    bound = gradients_in_place(compiled.train_step, compiled.spec)
    if len(compiled.spec.flat) < 2:      # one trainable tensor (or none): nothing is joined
        assert bound is None
        return
    graph = bound.model.graph
    onnx.checker.check_model(bound.model, full_check=True)
    assert not any(node.op_type == "Concat" and node.output[0] == compiled.spec.gradient for node in graph.node)
    reshape = producers(graph)[compiled.spec.gradient]
    assert reshape.op_type == "Reshape" and reshape.input[0] == GRADS
    outputs = [v.name for v in bound.outputs]
    assert set(outputs) <= {o.name for o in graph.output}
    assert set(outputs) <= ancestors(graph, compiled.spec.gradient)      # read after every write
    # the slices tile GRADS in the order of the parameters
    assert [v.offset for v in bound.outputs] == [v.offset for v in compiled.spec.flat]
    assert [int(np.prod(v.shape)) for v in bound.outputs] == [v.size for v in compiled.spec.flat]


@pytest.mark.parametrize("spec", ["example:digits_deep", "example:digits_cnn", "layer:embed_gru"])
def test_onnx_runtime_keeps_the_order_after_its_optimisations(spec, tmp_path):
    # the order comes only from the shape's path through x > +inf; a rewrite that folded it away
    # would let ONNX Runtime read GRADS before the gradients are in it
    compiled = case(spec).compiled
    bound = gradients_in_place(compiled.train_step, compiled.spec)
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(bound.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "optimised.onnx"))
    assert {v.name for v in bound.outputs} <= ancestors(optimised.graph, compiled.spec.gradient)


def plain_step(monkeypatch):
    """The runner's step with its gradients joined, as compiled."""
    built = runtime.session.training_graph
    monkeypatch.setattr(runtime.session, "training_graph",
                        lambda compiled, device="cpu", folded=None: built(compiled, device, True, folded))


@pytest.mark.parametrize("spec", ALL_CASES)
def test_in_place_gradients_train_bit_for_bit_as_the_joined_ones(spec, monkeypatch):
    compiled = case(spec).compiled
    runner, losses, arrays = trained(compiled, 3)
    assert bool(runner.gradients) == (len(compiled.spec.flat) > 1)
    plain_step(monkeypatch)
    reference, reference_losses, reference_arrays = trained(compiled, 3)
    assert not reference.gradients
    np.testing.assert_array_equal(losses, reference_losses)
    assert arrays.keys() == reference_arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], reference_arrays[name], err_msg=name)


OPTIONS = {"clipping": "  optimizer adam lr=0.05\n  clip_norm 0.5\n",
           "l2": "  optimizer momentum lr=0.1\n  regularize l2 lambda=0.01\n",
           "rmsprop": "  optimizer rmsprop lr=0.01\n"}


@pytest.mark.parametrize("option", OPTIONS)
def test_options_that_read_the_joined_gradient_train_as_before(option, monkeypatch):
    text = f"""model options
input x: float[5]
output y: class[3]
layers {{
  dense 6 relu
  dense 3 softmax
}}
train {{
{OPTIONS[option]}  batch_size 8
  seed 0
}}
"""
    compiled = compile_program(dsl.load(text))
    runner, losses, arrays = trained(compiled, 4)
    assert runner.gradients
    plain_step(monkeypatch)
    _, reference_losses, reference_arrays = trained(compiled, 4)
    np.testing.assert_array_equal(losses, reference_losses)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], reference_arrays[name], err_msg=name)


def test_a_nan_gradient_still_reaches_the_update():
    # x > +inf is false for NaN as well: the Reshape's shape stays (1, n) and the step runs
    compiled = case("layer:dense_relu").compiled
    runner = StepRunner(compiled, "cpu", 1)
    x = np.full((4, 4), np.nan, np.float32)
    loss = runner.step({compiled.spec.x: x, compiled.spec.y: np.zeros(4, np.int64)})
    assert np.isnan(loss)
    assert np.isnan(runner.arrays()[compiled.spec.flat[0].name]).all()


def test_a_layer_whose_names_the_rewrite_would_take_keeps_the_concat():
    text = """model clash
input x: float[5]
output y: class[3]
layers {
  grads: dense 6 relu
  dense 3 softmax
}
train {
  optimizer adam lr=0.05
  batch_size 8
}
"""
    compiled = compile_program(dsl.load(text))
    assert gradients_in_place(compiled.train_step, compiled.spec) is not None     # grads.W, grads.Z: no clash
    clashing = onnx.ModelProto()
    clashing.CopyFrom(compiled.train_step)
    node = next(n for n in clashing.graph.node if n.output[0] == "grads")
    node.output[0] = GRADS                                  # as if a layer made a value named grads.bound
    for other in clashing.graph.node:
        other.input[:] = [GRADS if name == "grads" else name for name in other.input]
    assert gradients_in_place(clashing, compiled.spec) is None
