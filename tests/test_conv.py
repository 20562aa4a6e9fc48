"""Convolution and pooling in the compiler: sizes, located errors, lowering, and the emitted ops.

The numerical gradients of the new ops are in tests/test_ops.py and whole-network parity with
PyTorch in tests/test_parity_conv.py; this file checks what lies around them: the output-size
rule and `padding=same` against torch, the compile errors (wrong rank, empty outputs, a dense
layer on an image), parameter names, shapes, initialisation, `dlnc shapes` rows and FLOPs,
batchnorm and dropout after conv, and the argmax indices max pooling's gradient scatters to.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch.nn import functional as F

import dsl
from compiler.emit import to_onnx
from compiler.ir import Builder
from compiler.lower import conv_pads
from compiler.program import compile_program
from compiler.shapes import same_padding, window_count
from dsl.errors import DlnError
from runtime.report import shapes_table
from runtime.session import StepRunner


def program(input_type: str, layers: str, output: str = "class[3]", train: str = "optimizer sgd lr=0.1") -> str:
    body = "\n".join(f"  {line.strip()}" for line in layers.strip().split(";"))
    return (f"model t\ninput x: {input_type}\noutput y: {output}\nlayers {{\n{body}\n}}\n"
            f"train {{ {train}; batch_size 8; epochs 1 }}\n")


def compile_text(text: str):
    return compile_program(dsl.load(text, "t.dln"))


def compile_error(text: str) -> DlnError:
    with pytest.raises(DlnError) as info:
        compile_text(text)
    return info.value


# ---------------------------------------------------------------- sizes
@pytest.mark.parametrize("n,k,s,p", [(8, 3, 1, 0), (7, 2, 2, 0), (6, 3, 2, 1), (12, 5, 3, 2), (5, 5, 1, 0),
                                     (9, 4, 3, 1)])
def test_output_size_matches_torch(n, k, s, p):
    x = torch.zeros(1, 1, n, n + 1)
    y = F.conv2d(x, torch.zeros(1, 1, k, k), stride=s, padding=p)
    assert y.shape[2:] == (window_count(n, k, s, p, p), window_count(n + 1, k, s, p, p))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("n", [5, 8])
def test_same_padding_keeps_the_size_and_matches_torch_at_stride_1(n, k):
    top, bottom = same_padding(n, k, 1)
    assert window_count(n, k, 1, top, bottom) == n
    x, w = torch.randn(1, 2, n, n), torch.randn(3, 2, k, k)
    ours = F.conv2d(F.pad(x, (top, bottom, top, bottom)), w)
    np.testing.assert_allclose(ours.numpy(), F.conv2d(x, w, padding="same").numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,s", [(9, 2, 2), (10, 3, 2), (11, 4, 3), (8, 1, 2)])
def test_same_padding_at_larger_strides_gives_ceil_n_over_s(n, k, s):
    top, bottom = same_padding(n, k, s)
    assert window_count(n, k, s, top, bottom) == -(-n // s) and bottom - top in (0, 1)


def test_even_filters_pad_the_extra_row_at_the_bottom_and_right():
    assert conv_pads("same", 4, 1, 6, 7) == (1, 1, 2, 2)
    assert conv_pads("same", 3, 1, 6, 7) == (1, 1, 1, 1)
    assert conv_pads(2, 5, 1, 6, 7) == (2, 2, 2, 2)


# ---------------------------------------------------------------- located errors
def test_conv_on_a_flat_input_shows_both_shapes():
    e = compile_error(program("float[64]", "conv 8 size=3 relu; flatten; dense 3 softmax"))
    assert "(N, 64)" in e.message and "(N, C, H, W)" in e.message and "conv_1" in e.message
    assert e.span.line == 5 and "t.dln:5:3" in e.render()


def test_an_empty_conv_output_shows_both_shapes():
    e = compile_error(program("float[1, 3, 3]", "conv 8 size=5 relu; flatten; dense 3 softmax"))
    assert "(N, 1, 3, 3)" in e.message and "(N, 8, -1, -1)" in e.message and e.span.line == 5


def test_an_empty_pool_output_is_located_at_the_pool():
    text = program("float[1, 6, 6]", "conv 4 size=3 stride=2 relu; maxpool size=3; flatten; dense 3 softmax")
    e = compile_error(text)
    assert "maxpool_2" in e.message and "(N, 4, 2, 2)" in e.message and "(N, 4, 0, 0)" in e.message
    assert e.span.line == 6


def test_pool_after_flatten_is_a_rank_error():
    e = compile_error(program("float[1, 6, 6]", "flatten; avgpool size=2; dense 3 softmax"))
    assert "avgpool_2" in e.message and "(N, 36)" in e.message and e.span.line == 6


def test_dense_on_an_image_needs_flatten():
    e = compile_error(program("float[1, 6, 6]", "conv 4 size=3 relu; dense 3 softmax"))
    assert "(N, 4, 4, 4)" in e.message and "flatten" in e.message and e.span.line == 6


def test_softmax_belongs_to_the_output_layer():
    e = compile_error(program("float[1, 6, 6]", "conv 4 size=3 softmax; flatten; dense 3 softmax"))
    assert "softmax" in e.message and e.span.line == 5


# ---------------------------------------------------------------- lowering
DIGITS_CNN = """conv 8 size=3 padding=same relu; maxpool size=2; conv 16 size=3 padding=same relu;
                avgpool size=2; flatten; dense 10 softmax"""


def test_parameters_shapes_and_regularisation():
    compiled = compile_text(program("float[1, 8, 8]", DIGITS_CNN, "class[10]"))
    params = {p.name: p for p in compiled.spec.params}
    assert {n: p.init.shape for n, p in params.items()} == {
        "conv_1.W": (8, 1, 3, 3), "conv_1.b": (8,), "conv_3.W": (16, 8, 3, 3), "conv_3.b": (16,),
        "dense_6.W": (10, 64), "dense_6.b": (10,)}
    assert {n for n, p in params.items() if p.regularized} == {"conv_1.W", "conv_3.W", "dense_6.W"}


def test_he_and_xavier_initialisation_use_the_fan_in_c_k_k():
    compiled = compile_text(program("float[16, 8, 8]", "conv 64 size=3 relu; conv 64 size=3 tanh; flatten; "
                                    "dense 3 softmax"))
    params = {p.name: p.init for p in compiled.spec.params}
    assert params["conv_1.W"].std() == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)
    assert params["conv_2.W"].std() == pytest.approx(np.sqrt(1 / (64 * 9)), rel=0.05)
    assert not params["conv_1.b"].any()


def test_shapes_table_shows_every_conv_and_pool_with_parameters_and_flops():
    compiled = compile_text(program("float[1, 8, 8]", DIGITS_CNN, "class[10]"))
    infos = {i.name: i for i in compiled.layers}
    assert infos["conv_1"].output == ("N", 8, 8, 8) and infos["maxpool_2"].output == ("N", 8, 4, 4)
    assert infos["conv_3"].output == ("N", 16, 4, 4) and infos["avgpool_4"].output == ("N", 16, 2, 2)
    assert infos["flatten_5"].output == ("N", 64)
    # 2·k·k·C·F·Ho·Wo + F·Ho·Wo
    assert infos["conv_1"].flops == 2 * 9 * 1 * 8 * 64 + 8 * 64
    assert infos["conv_3"].flops == 2 * 9 * 8 * 16 * 16 + 16 * 16
    table = shapes_table(compiled.program, compiled.layers)
    for row in ("conv_1 (conv)", "maxpool_2 (maxpool)", "avgpool_4 (avgpool)", "(N, 16, 2, 2)", "1,168"):
        assert row in table
    assert "1,898" in table                     # 80 + 1,168 + 650 parameters


def test_only_standard_onnx_ops():
    compiled = compile_text(program("float[1, 9, 9]", "conv 4 size=2 stride=2 padding=same relu; batchnorm; "
                                    "maxpool size=2 stride=1; dropout keep_prob=0.8; flatten; dense 3 softmax"))
    for model in (compiled.model, compiled.train_step):
        assert {n.domain for n in model.graph.node} <= {""}
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


# ---------------------------------------------------------------- batchnorm and dropout after conv
def test_batchnorm_after_conv_is_per_channel_and_exports_running_statistics():
    compiled = compile_text(program("float[2, 6, 6]", "conv 5 size=3 relu; batchnorm; flatten; dense 3 softmax"))
    state = {s.name: s.init for s in compiled.spec.state}
    params = {p.name: p for p in compiled.spec.params}
    assert state["batchnorm_2.running_mean"].shape == (5,) and state["batchnorm_2.running_var"].shape == (5,)
    assert params["batchnorm_2.gamma"].init.shape == (5,) and not params["batchnorm_2.gamma"].regularized
    # inference uses the running statistics: an example's output does not depend on its batch
    x = np.random.default_rng(0).normal(size=(6, 2, 6, 6)).astype(np.float32)
    session = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0][:1], session.run(None, {"x": x[:1]})[0], rtol=1e-6)


def test_dropout_after_conv_has_image_shaped_noise_and_masks_the_gradient():
    text = program("float[1, 6, 6]", "conv 3 size=3 relu; dropout keep_prob=0.5; flatten; dense 3 softmax")
    compiled = compile_text(text)
    assert compiled.spec.noise == (("dropout_2.noise", ("N", 3, 4, 4)),)
    assert "dropout_2.noise" not in {i.name for i in compiled.model.graph.input}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 1, 6, 6)).astype(np.float32), np.arange(8) % 3
    before = {p.name: p.init for p in compiled.spec.params}
    runner = StepRunner(compiled)
    runner.step({"x": x, "y": y, "dropout_2.noise": np.full((8, 3, 4, 4), 0.99, np.float32)})  # all dropped
    after = runner.arrays()
    np.testing.assert_array_equal(after["conv_1.W"], before["conv_1.W"])
    assert not np.array_equal(after["dense_4.b"], before["dense_4.b"])
    runner.step({"x": x, "y": y, "dropout_2.noise": np.zeros((8, 3, 4, 4), np.float32)})       # all kept
    assert not np.array_equal(runner.arrays()["conv_1.W"], before["conv_1.W"])


# ---------------------------------------------------------------- the indices max pooling scatters to
@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), (2, 1), (3, 1)])
def test_maxpool_argmax_matches_torch_indices(size, stride):
    """Both emissions (MaxPool's Indices output; Gather + ArgMax at unit stride) give torch's
    per-plane indices offset by (n·C + c)·H·W, in ONNX Runtime and in onnx.reference."""
    b = Builder("float32")
    x = b.input("x", ("N", 3, 7, 6))
    out = b.op("maxpool_argmax", x, kernel=(size, size), strides=(stride, stride))
    model = to_onnx(b.graph("argmax", [out]))
    xs = np.random.default_rng(1).normal(size=(2, 3, 7, 6)).astype(np.float32)
    _, indices = F.max_pool2d(torch.from_numpy(xs), size, stride, return_indices=True)
    planes = (np.arange(2 * 3).reshape(2, 3, 1, 1) * 7 * 6)
    want = indices.numpy() + planes
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"x": xs})[0], want)
