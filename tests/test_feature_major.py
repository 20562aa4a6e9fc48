"""Dense chains held feature-major in the training step: which layers, the shapes and Gemms the
step gets, the exported model left batch-first, and the same training as the batch-first step."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_cases import trained

import compiler.program
import dsl
from compiler.lower import feature_major_layers
from compiler.program import compile_program


def program_text(layers: str, input_type: str = "float[5]") -> str:
    return f"""model chain
input x: {input_type}
output y: class[3]
layers {{
{layers}
}}
train {{
  optimizer adam lr=0.05
  batch_size 8
  seed 0
}}
"""


MLP = program_text("  dense 6 relu\n  dense 4 tanh\n  dense 3 softmax")


@pytest.mark.parametrize("layers, expected", [
    ("dense 6 relu\ndense 4 tanh\ndense 3 softmax", {"dense_1", "dense_2"}),
    ("dense 6 leaky_relu\ndense 3 softmax", {"dense_1"}),
    ("dense 3 softmax", set()),
    # layers are numbered in order, whatever their kind; dropout's noise is fed batch-first, so the chain
    # stops in front of it
    ("dense 6 relu\ndropout keep_prob=0.5\ndense 4 relu\ndense 3 softmax", {"dense_3"}),
    ("dense 6 relu\nbatchnorm\ndense 3 softmax", set()),
])
def test_the_layers_kept_feature_major(layers, expected):
    program = dsl.load(program_text(layers))
    names = {layer.name for layer in program.layers}
    assert expected <= names
    assert feature_major_layers(program.layers) == expected


def test_after_a_conv_the_dense_chain_starts_at_the_flattened_input():
    program = dsl.load(program_text("conv 2 size=3 relu\nflatten\ndense 6 relu\ndense 3 softmax", "float[1, 6, 6]"))
    assert feature_major_layers(program.layers) == {"dense_3"}


def shapes(model: onnx.ModelProto) -> dict[str, list]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}


def gemm(model: onnx.ModelProto, output: str) -> tuple[list[str], dict]:
    node = next(n for n in model.graph.node if n.output[0] == output)
    return list(node.input), {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_the_training_step_holds_the_hidden_activations_feature_major():
    c = compile_program(dsl.load(MLP))
    step, exported = shapes(c.train_step), shapes(c.model)
    assert step["dense_1"][0] == 6 and step["dense_2"][0] == 4 and step["dense_3.Z"][1] == 3
    assert exported["dense_1"][1] == 6 and exported["dense_2"][1] == 4
    # forward: Yᵀ = W·xᵀ, then W·Xᵀ, then the logits batch-first again
    assert gemm(c.train_step, "dense_1.Z")[0][:2] == ["dense_1.W", "x"]
    assert gemm(c.train_step, "dense_2.Z") == (["dense_2.W", "dense_1", "dense_2.Z.bias_column"], {"transB": 0})
    assert gemm(c.train_step, "dense_3.Z")[1] == {"transA": 1, "transB": 1}
    assert not any(n.op_type == "Transpose" for n in c.train_step.graph.node)
    # the exported model is what other tools read: batch-first Gemms, x first
    assert all(n.input[0] != "dense_1.W" for n in c.model.graph.node)


def test_feature_major_trains_as_the_batch_first_step(monkeypatch):
    _, losses, arrays = trained(compile_program(dsl.load(MLP)), 4)
    monkeypatch.setattr(compiler.program, "feature_major_layers", lambda layers: frozenset())
    batch_first = compile_program(dsl.load(MLP))
    assert shapes(batch_first.train_step)["dense_1"][1] == 6
    _, reference_losses, reference = trained(batch_first, 4)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert arrays.keys() == reference.keys()
    for name in arrays:
        np.testing.assert_allclose(arrays[name], reference[name], rtol=1e-4, atol=1e-6, err_msg=name)
