"""Updates written over their old values: which inputs qualify (`in_place_updates`), the one
buffer the runner's two sets then share, and training that is bit for bit the two-buffer one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_cases import trained
from onnx import TensorProto, helper

import dsl
import runtime.session
from compiler.program import FLAT, TrainStepSpec, compile_program
from runtime.session import in_place_updates


def program_text(extra: str = "", optimizer: str = "adam lr=0.05") -> str:
    return f"""model inplace
input x: float[5]
output y: class[3]
layers {{
  dense 6 relu
  dense 4 tanh
  dense 3 softmax
}}
train {{
  optimizer {optimizer}
  batch_size 8
  seed 0
{extra}}}
"""


def updated_in_place(text: str) -> frozenset[str]:
    c = compile_program(dsl.load(text))
    return in_place_updates(c.train_step.graph, c.spec)


def test_adam_updates_the_parameters_and_moments_in_place():
    # Adam's scalar k is read beside the node that makes the new k (k_prev / k), so it keeps two
    assert updated_in_place(program_text()) == {FLAT, f"{FLAT}.v", f"{FLAT}.s", "step"}


def test_a_weight_the_l2_cost_reads_keeps_two_buffers():
    # the cost term Σ‖W‖² is read for the reported loss only, not on the way to the new weights:
    # ONNX Runtime may run it after the update, so the update must not overwrite W
    assert updated_in_place(program_text("  regularize l2 lambda=0.01\n")) == {f"{FLAT}.v", f"{FLAT}.s", "step"}


def test_batchnorm_running_statistics_are_updated_in_place():
    text = program_text().replace("  dense 4 tanh\n", "  dense 4 tanh\n  batchnorm\n")
    c = compile_program(dsl.load(text))
    running = {name for name in c.spec.updates if name not in (FLAT, f"{FLAT}.v", f"{FLAT}.s", "step", "adam.k")}
    assert running and running <= in_place_updates(c.train_step.graph, c.spec)


def spec_for(updates: dict[str, str]) -> TrainStepSpec:
    return TrainStepSpec(params=(), trainable=(), state=(), hyper={}, x="x", y="y", noise=(), updates=updates)


def graph(nodes, inputs=("X", "G", "c")) -> onnx.GraphProto:
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in inputs]
    return helper.make_graph(nodes, "g", value, [helper.make_tensor_value_info("new.X", TensorProto.FLOAT, [2])])


def reading_x_in_a_branch(output: str) -> onnx.NodeProto:
    """An If whose then-branch reads X from the outer scope (the node's inputs do not show it)."""
    then = helper.make_graph([helper.make_node("Neg", ["X"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["G"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    return helper.make_node("If", ["cond"], [output], then_branch=then, else_branch=other)


@pytest.mark.parametrize("nodes, expected", [
    # the writer reads X elementwise: X[i] is read where new X[i] is written
    ([helper.make_node("Sub", ["X", "G"], ["new.X"])], {"X"}),
    # a read of X that the writer depends on runs first, whatever the order
    ([helper.make_node("Mul", ["X", "c"], ["m"]), helper.make_node("Add", ["m", "G"], ["new.X"])], {"X"}),
    # a read of X on no path to the writer may run after it
    ([helper.make_node("Mul", ["X", "c"], ["m"]), helper.make_node("Add", ["G", "c"], ["new.X"])], set()),
    # a writer that is not elementwise may read X[j] after writing new X[i]
    ([helper.make_node("MatMul", ["X", "G"], ["new.X"])], set()),
    # reads inside a subgraph count: on the writer's path, and off it
    ([reading_x_in_a_branch("b"), helper.make_node("Add", ["b", "G"], ["new.X"])], {"X"}),
    ([reading_x_in_a_branch("b"), helper.make_node("Add", ["G", "c"], ["new.X"])], set()),
], ids=["elementwise-writer", "read-on-the-path", "read-off-the-path", "matmul-writer",
        "subgraph-on-the-path", "subgraph-off-the-path"])
def test_which_updates_may_overwrite_their_input(nodes, expected):
    assert in_place_updates(graph(nodes), spec_for({"X": "new.X"})) == expected


def train(text: str, steps: int = 5):
    return trained(compile_program(dsl.load(text)), steps)


@pytest.mark.parametrize("optimizer", ["adam lr=0.05", "momentum lr=0.1", "rmsprop lr=0.01", "sgd lr=0.1"])
def test_in_place_trains_bit_for_bit_as_two_buffers(optimizer, monkeypatch):
    text = program_text(optimizer=optimizer)
    runner, losses, arrays = train(text)
    assert FLAT in runner.in_place
    assert runner.sets[0][FLAT] is runner.sets[1][FLAT]
    assert np.shares_memory(runner.values()["dense_1.W"].numpy(), runner.sets[0][FLAT].numpy())
    monkeypatch.setattr(runtime.session, "in_place_updates", lambda graph, spec: frozenset())
    two, reference_losses, reference = train(text)
    assert not two.in_place and two.sets[0][FLAT] is not two.sets[1][FLAT]
    np.testing.assert_array_equal(losses, reference_losses)
    assert arrays.keys() == reference.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], reference[name], err_msg=name)


def test_load_writes_the_shared_buffer():
    runner, _, _ = train(program_text(), steps=2)
    runner.load({"dense_1.W": np.full((6, 5), 0.5, np.float32)})
    for index in (0, 1):
        flat = runner.sets[index][FLAT].numpy()
        np.testing.assert_array_equal(runner.views["dense_1.W"].of(flat), 0.5)
