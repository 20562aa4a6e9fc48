"""Every IR op: table completeness, and its gradient against float64 central differences.

Each case builds f = Σ r ⊙ op(inputs) for a fixed random r, differentiates it with the
compiler's reverse mode, emits ONNX in float64 and runs it in onnx.reference. The analytic
directional derivative ⟨∇f, v⟩ must match (f(x + h v) − f(x − h v)) / 2h in a random
direction v. The same graph then runs in ONNX Runtime (float64) and must agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from compiler.autodiff import grad
from compiler.emit import EMIT_RULES, to_onnx
from compiler.ir import NON_DIFFERENTIABLE, OPS, Builder
from compiler.shapes import SHAPE_RULES
from compiler.simplify import simplify
from compiler.vjp import VJP_RULES


@dataclass(frozen=True)
class Case:
    op: str
    shapes: tuple                     # shapes of the differentiable inputs ("N" allowed: fed as 3)
    attrs: dict = field(default_factory=dict)
    extra: tuple = ()                 # constant extra inputs, appended after the differentiable ones
    positive: bool = False            # draw inputs away from 0 (log, sqrt, pow, abs, relu kinks)
    id: str = ""


def labels(n, c):
    return np.arange(n, dtype=np.int64) % c


def conv(stride, pads):
    """attrs of a convolution: stride s or (sh, sw); pads p or (top, left, bottom, right)."""
    strides = (stride, stride) if isinstance(stride, int) else stride
    return {"strides": strides, "pads": (pads,) * 4 if isinstance(pads, int) else pads}


def window(size, stride):
    return {"kernel": (size, size), "strides": (stride, stride)}


def ties_in_windows() -> tuple[np.ndarray, np.ndarray]:
    """x (2, 2, 4, 6) whose 2×2 windows hold ties (zeros, as after a ReLU, and equal positive
    values), and y = its 2×2 max pooling: maxpool_grad must pick each window's first maximum."""
    x = np.maximum(np.random.default_rng(5).normal(size=(2, 2, 4, 6)), 0.0)
    x[0, 0, :2, :2] = 0.0
    x[0, 1, 2:, 2:4] = 0.75
    x[1, 0, 0, 4:] = x[1, 0, 1, 4] = 2.5
    y = x.reshape(2, 2, 2, 2, 3, 2).max(axis=(3, 5))
    return x, y


TIES = ties_in_windows()
TIES3 = tuple(np.concatenate([t, t[:1] * 2.0]) for t in TIES)      # three images, for the symbolic batch


def ties_in_3x2_windows() -> tuple[np.ndarray, np.ndarray]:
    """x (2, 2, 6, 4) with zeros and equal positive values inside 3×2 windows, and y its 3×2 max pooling."""
    x = np.maximum(np.random.default_rng(10).normal(size=(2, 2, 6, 4)), 0.0)
    x[0, 0, :3, :2] = 0.0
    x[1, 1, 3:, 2:] = 1.25
    x[0, 1, 4, 0] = x[0, 1, 5, 1] = x[0, 1, 3:, :2].max() + 1.0
    return x, x.reshape(2, 2, 2, 3, 2, 2).max(axis=(3, 5))
CASES = [
    Case("identity", ((3, 4),)),
    Case("neg", ((3, 4),)),
    Case("exp", ((3, 4),)),
    Case("log", ((3, 4),), positive=True),
    Case("sqrt", ((3, 4),), positive=True),
    Case("abs", ((3, 4),), positive=True),
    Case("relu", ((3, 4),), positive=True, id="relu"),
    Case("leaky_relu", ((3, 4),), {"alpha": 0.2}, positive=True),
    Case("sigmoid", ((3, 4),)),
    Case("tanh", ((3, 4),)),
    Case("softmax", ((3, 4),), {"axis": -1}),
    Case("log_softmax", ((3, 4),), {"axis": -1}),
    Case("add", ((3, 4), (4,)), id="add-broadcast"),
    Case("sub", ((3, 1), (1, 4)), id="sub-broadcast"),
    Case("mul", ((3, 4), (3, 4))),
    Case("div", ((3, 4), (4,)), positive=True),
    Case("pow", ((3, 4), (3, 4)), positive=True),
    Case("maximum", ((3, 4), (3, 4))),
    Case("minimum", ((3, 4), (4,))),
    Case("where", ((3, 4), (3, 4)), extra=(np.array([[True, False, True, False]] * 3),), id="where"),
    Case("dense", ((3, 4), (5, 4), (5,))),
    # feature-major layouts (a dense chain in the training step): x as xᵀ (n_in, m), y as yᵀ (n_out, m)
    Case("dense", ((4, "N"), (5, 4), (5,)), {"x_t": 1}, id="dense-x_t"),
    Case("dense", (("N", 4), (5, 4), (5,)), {"y_t": 1}, id="dense-y_t"),
    Case("dense", ((4, "N"), (5, 4), (5,)), {"x_t": 1, "y_t": 1}, id="dense-x_t-y_t"),
    Case("matmul", ((3, 4), (4, 5)), id="matmul-nn"),
    Case("matmul", ((4, 3), (4, 5)), {"trans_a": 1}, id="matmul-tn"),
    Case("matmul", ((3, 4), (5, 4)), {"trans_b": 1}, id="matmul-nt"),
    Case("matmul", ((4, 3), (5, 4)), {"trans_a": 1, "trans_b": 1}, id="matmul-tt"),
    Case("reduce_sum", ((3, 4),), {"axes": (0,), "keepdims": False}, id="reduce_sum-0"),
    Case("reduce_sum", ((3, 4),), {"axes": None, "keepdims": False}, id="reduce_sum-all"),
    Case("reduce_sum", ((4, "N"),), {"axes": (1,), "keepdims": False}, id="reduce_sum-1-batch"),
    Case("reduce_mean", (("N", 4),), {"axes": (0,), "keepdims": True}, id="reduce_mean-batch"),
    Case("reduce_mean", ((3, 4),), {"axes": (1,), "keepdims": False}, id="reduce_mean-1"),
    Case("unsqueeze", ((3, 4),), {"axes": (1,)}),
    Case("squeeze", ((3, 1),), {"axes": (1,)}),
    Case("reshape_as", ((3, 4),), extra=(np.zeros((2, 6)),)),
    Case("expand_as", ((1, 4),), extra=(np.zeros((3, 4)),)),
    Case("flatten", ((3, 2, 2),)),
    Case("as_row", ((3, 2, 2),)),
    Case("softmax_cross_entropy", (("N", 4),), extra=(labels(3, 4),)),
    Case("sigmoid_bce", (("N", 1),), extra=(np.array([[1.0], [0.0], [1.0]]),)),
    Case("mse", (("N", 2),), extra=(np.arange(6.0).reshape(3, 2) / 6,)),
    # convolution: attrs strides (sh, sw), pads (top, left, bottom, right)
    Case("conv", (("N", 3, 5, 5), (4, 3, 3, 3), (4,)), conv(1, 0), id="conv-3x3-valid"),
    Case("conv", (("N", 2, 7, 6), (3, 2, 2, 2), (3,)), conv(2, 0), id="conv-even-stride2-unread-cropped"),
    Case("conv", ((2, 2, 6, 6), (3, 2, 3, 3), (3,)), conv(2, 1), id="conv-pad1-stride2-unread-in-padding"),
    Case("conv", ((2, 2, 5, 5), (2, 2, 4, 4), (2,)), conv(1, (1, 1, 2, 2)), id="conv-same-even-filter"),
    Case("conv", ((2, 2, 6, 7), (2, 2, 3, 3), (2,)), conv(2, (0, 1, 1, 1)), id="conv-same-stride2"),
    Case("conv", ((2, 1, 8, 8), (2, 1, 2, 3)), conv((3, 2), (1, 0, 0, 1)), id="conv-no-bias-rect-stride3"),
    Case("conv_transpose", ((2, 4, 3, 3), (4, 3, 3, 3)), {**conv(2, 1), "output_padding": (1, 0)}),
    Case("conv_filter_grad", ((2, 3, 6, 5), (2, 4, 3, 2)), {**conv(2, (1, 0, 1, 0)), "kernel": (3, 3)}),
    # one input channel (the first layer on grey images): the transposed-tensor Conv is a single image
    Case("conv_filter_grad", ((2, 1, 7, 6), (2, 3, 3, 2)), {**conv((2, 3), (1, 0, 0, 1)), "kernel": (3, 2)},
         id="conv_filter_grad-one-channel-unread"),
    Case("conv", (("N", 1, 6, 6), (3, 1, 4, 4), (3,)), conv(1, (1, 1, 2, 2)), id="conv-one-channel-same-even"),
    # attr batch: a one-channel x is grouped by image where the batch has the compiled size (an If where it is
    # known at run time only); several channels are summed whatever the batch
    Case("conv_filter_grad", ((2, 1, 6, 5), (2, 4, 3, 2)), {**conv(2, (1, 0, 1, 0)), "kernel": (3, 3), "batch": 2},
         id="conv_filter_grad-by-image"),
    Case("conv_filter_grad", ((2, 3, 6, 5), (2, 4, 3, 2)), {**conv(2, (1, 0, 1, 0)), "kernel": (3, 3), "batch": 2},
         id="conv_filter_grad-channels-summed"),
    Case("conv_filter_grad", (("N", 1, 7, 6), ("N", 3, 3, 2)), {**conv((2, 3), (1, 0, 0, 1)), "kernel": (3, 2), "batch": 3},
         id="conv_filter_grad-if-the-compiled-batch"),
    Case("conv_filter_grad", (("N", 1, 7, 6), ("N", 3, 3, 2)), {**conv((2, 3), (1, 0, 0, 1)), "kernel": (3, 2), "batch": 5},
         id="conv_filter_grad-if-another-batch"),
    # pooling (no padding): overlapping windows (stride < size), odd sizes that leave rows unread
    Case("maxpool", (("N", 2, 7, 7),), window(3, 2), id="maxpool-overlapping"),
    Case("maxpool", ((2, 2, 5, 5),), window(2, 2), id="maxpool-2x2-odd"),
    Case("maxpool", ((1, 2, 4, 5),), window(2, 1), id="maxpool-stride1"),
    Case("maxpool", (("N", 2, 4, 6),), window(2, 2), id="maxpool-tiling"),
    Case("maxpool", ((2, 1, 6, 6),), {"kernel": (3, 2), "strides": (3, 2)}, id="maxpool-tiling-3x2"),
    Case("maxpool_grad", ((2, 2, 2, 3),), window(2, 2), extra=TIES, id="maxpool_grad-ties"),
    # the filter gradient of a conv in front of a tiling max pool, from the pooled gradient g (r, y: the
    # pool's input and output, ties included); x's gradient is the conv_transpose of the unpooled g
    Case("conv_filter_grad_pooled", ((2, 3, 6, 7), (2, 2, 2, 3)), {**conv(1, 0), "kernel": (3, 2), "pool": (2, 2)},
         extra=TIES, id="conv_filter_grad_pooled"),
    Case("conv_filter_grad_pooled", ((2, 1, 8, 14), (2, 2, 2, 3)),
         {**conv(2, (1, 0, 1, 0)), "kernel": (3, 3), "pool": (2, 2), "batch": 2}, extra=TIES,
         id="conv_filter_grad_pooled-stride2-unread-by-image"),
    Case("conv_filter_grad_pooled", ((2, 1, 8, 5), (2, 2, 2, 2)), {**conv(1, 0), "kernel": (3, 2), "pool": (3, 2)},
         extra=ties_in_3x2_windows(), id="conv_filter_grad_pooled-3x2-pool"),
    Case("conv_filter_grad_pooled", (("N", 1, 4, 5), ("N", 2, 2, 3)),
         {**conv(1, (1, 1, 0, 1)), "kernel": (2, 2), "pool": (2, 2), "batch": 3}, extra=TIES3,
         id="conv_filter_grad_pooled-if-the-compiled-batch"),
    Case("conv_filter_grad_pooled", (("N", 1, 4, 5), ("N", 2, 2, 3)),
         {**conv(1, (1, 1, 0, 1)), "kernel": (2, 2), "pool": (2, 2), "batch": 4}, extra=TIES3,
         id="conv_filter_grad_pooled-if-another-batch"),
    Case("avgpool", (("N", 2, 5, 5),), window(2, 2), id="avgpool-2x2-odd"),
    Case("avgpool", ((2, 2, 7, 6),), window(3, 2), id="avgpool-overlapping"),
    Case("avgpool_transpose", ((2, 3, 3, 2),), {**window(3, 2), "input_size": (7, 6)}),
    Case("take", ((3, 4),), extra=(np.array([[0, 5, 5, 11, 2], [7, 0, 3, 5, 9]]),), id="take-repeats"),
    Case("scatter_add", ((2, 5),), extra=(np.array([[0, 5, 5, 11, 2], [7, 0, 3, 5, 9]]), np.zeros((3, 4))),
         id="scatter_add-repeats"),
    # sequences (m, T, ...): slicing ops and their adjoints; the ONNX recurrent ops (their VJP unrolls the cell)
    Case("embedding", ((5, 3),), extra=(np.array([[0, 4, 4], [2, 0, 1]]),), id="embedding-repeats"),
    Case("embedding_grad", ((2, 3, 4),), extra=(np.array([[0, 4, 4], [2, 0, 1]]), np.zeros((5, 4))),
         id="embedding_grad-repeats"),
    Case("time_step", (("N", 4, 3),), {"t": 2}),
    Case("time_step", ((2, 4, 3),), {"t": -1}, id="time_step-last"),
    Case("stack_steps", ((3, 2), (3, 2), (3, 2))),
    Case("slice_axis", ((3, 6),), {"axis": 1, "start": 2, "end": 5}),
    Case("slice_axis", ((6,),), {"axis": -1, "start": 0, "end": 3}, id="slice_axis-1d"),
    Case("pad_axis", ((3, 2, 4),), {"axis": 1, "before": 1, "after": 2}),
    Case("concat", ((3, 2), (3, 4)), {"axis": 1}),
    Case("fold_time", ((3, 2, 4),)),
    Case("unfold_time", ((6, 4),), extra=(np.zeros((3, 2, 5)),)),
    Case("rnn_seq", (("N", 4, 3), (1, 5, 3), (1, 5, 5), (1, 10)), {"hidden": 5, "activation": "tanh"}),
    Case("rnn_seq", ((2, 3, 3), (1, 4, 3), (1, 4, 4), (1, 8)), {"hidden": 4, "activation": "tanh", "last": True},
         id="rnn_seq-last"),
    Case("gru_seq", (("N", 4, 3), (1, 15, 3), (1, 15, 5), (1, 30)), {"hidden": 5}),
    Case("gru_seq", ((2, 3, 2), (1, 12, 2), (1, 12, 4), (1, 24)), {"hidden": 4, "last": True}, id="gru_seq-last"),
    Case("lstm_seq", (("N", 4, 3), (1, 20, 3), (1, 20, 5), (1, 40)), {"hidden": 5}),
    Case("lstm_seq", ((2, 3, 2), (1, 16, 2), (1, 16, 4), (1, 32)), {"hidden": 4, "last": True}, id="lstm_seq-last"),
]
DIFFERENTIABLE = sorted(set(OPS) - NON_DIFFERENTIABLE)


def test_every_op_has_every_rule():
    assert set(SHAPE_RULES) == set(OPS)
    assert set(EMIT_RULES) == set(OPS)
    assert set(VJP_RULES) == set(OPS), "an op lacks a VJP rule"


def test_every_differentiable_op_has_a_gradient_case():
    assert set(DIFFERENTIABLE) <= {c.op for c in CASES}


def _concrete(shape):
    return tuple(3 if d == "N" else d for d in shape)


def build(case: Case, dtype: str = "float64"):
    """The check graph f = Σ r ⊙ op(inputs) and its gradients; returns the model, the names of the
    differentiable inputs and the fixed feeds (the extra inputs, and r where the output has a batch)."""
    b = Builder(dtype)
    xs = [b.input(f"x{i}", s) for i, s in enumerate(case.shapes)]
    batch = ("N",) if case.shapes[0][0] == "N" else ()
    fixed = {f"e{i}": e.astype(dtype) if e.dtype == np.float64 else e for i, e in enumerate(case.extra)}
    consts = [b.input(name, batch + e.shape[len(batch):], dtype=str(e.dtype)) for name, e in fixed.items()]
    if case.op == "where":
        args = [consts[0], *xs]
    else:
        args = [*xs, *consts]
    y = b.op(case.op, *args, **case.attrs)
    r_value = np.random.default_rng(1).normal(size=_concrete(y.shape)).astype(dtype)
    if "N" in y.shape:
        r, fixed["r"] = b.input("r", y.shape), r_value
    else:
        r = b.const(r_value)
    f = b.op("reduce_sum", b.mul(y, r), axes=None, keepdims=False, name="f")
    grads = grad(b, f, xs)
    graph = simplify(b.graph("check", [f, *grads.values()]))
    return to_onnx(graph, opset=17), [x.name for x in xs], fixed


def draw(case: Case, rng):
    out = []
    for s in case.shapes:
        x = rng.normal(size=_concrete(s))
        out.append(np.abs(x) + 0.5 if case.positive else x)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id or c.op)
def test_gradient_matches_central_differences(case):
    rng = np.random.default_rng(0)
    model, names, fixed = build(case)
    onnx.checker.check_model(model, full_check=True)
    run = ReferenceEvaluator(model)
    xs = draw(case, rng)
    feeds = dict(zip(names, xs)) | fixed
    f, *grads = run.run(None, feeds)
    v = [rng.normal(size=x.shape) for x in xs]
    h = 1e-6
    plus = run.run(["f"], {n: x + h * d for n, x, d in zip(names, xs, v)} | fixed)[0]
    minus = run.run(["f"], {n: x - h * d for n, x, d in zip(names, xs, v)} | fixed)[0]
    numeric = (plus - minus) / (2 * h)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, v))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


# ONNX Runtime has no float64 Conv or ConvTranspose kernels: graphs that use them are compared in
# float32 instead (the reference evaluator run in float32 too), with a float32 tolerance.
FLOAT64_MISSING_IN_ORT = {"Conv", "ConvTranspose"}
FLOAT64_MISSING_IN_ORT |= {"RNN", "GRU", "LSTM"}      # float32 kernels only, too


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id or c.op)
def test_onnxruntime_agrees_with_reference(case):
    import onnxruntime as ort
    model, names, fixed = build(case)
    float32 = bool(FLOAT64_MISSING_IN_ORT & {n.op_type for n in model.graph.node})
    if float32:
        model, names, fixed = build(case, "float32")
    xs = [x.astype(np.float32) if float32 else x for x in draw(case, np.random.default_rng(2))]
    feeds = dict(zip(names, xs)) | fixed
    expected = ReferenceEvaluator(model).run(None, feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rtol, atol = (1e-5, 1e-5) if float32 else (1e-9, 1e-12)
    for got, want in zip(session.run(None, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_relu_mask_moves_before_max_unpooling():
    """relu → tiling maxpool: simplify applies the ReLU mask to the pooled gradient
    (`mask_before_unpooling`), and the gradient still goes to each window's first maximum, and
    only where that maximum is positive (windows of zeros after the ReLU, and positive ties)."""
    x, _ = TIES
    z = np.where(x == 0, -np.random.default_rng(6).uniform(0.1, 1.0, size=x.shape), x)
    b = Builder("float64")
    zin = b.input("z", z.shape)
    y = b.op("maxpool", b.op("relu", zin), **window(2, 2))
    r = np.random.default_rng(7).normal(size=y.shape)
    f = b.op("reduce_sum", b.mul(y, b.const(r)), axes=None, keepdims=False, name="f")
    graph = simplify(b.graph("check", list(grad(b, f, [zin]).values())))
    producers = graph.producers()
    (unpool,) = [n for n in graph.nodes if n.op == "maxpool_grad"]
    assert producers[unpool.inputs[0].name].op == "mul"                    # the pooled gradient, masked
    assert not [n for n in graph.nodes if n.op == "greater" and n.inputs[0].shape == z.shape]
    (dz,) = ReferenceEvaluator(to_onnx(graph, opset=17)).run(None, {"z": z})
    a = np.maximum(z, 0.0)
    windows = a.reshape(2, 2, 2, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 2, 2, 3, 4)
    picked = np.zeros_like(windows)
    np.put_along_axis(picked, windows.argmax(-1)[..., None], np.where(windows.max(-1) > 0, r, 0.0)[..., None], -1)
    expected = picked.reshape(2, 2, 2, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(z.shape)
    np.testing.assert_array_equal(dz, expected)


def _conv_relu_pool_grads(x_needs_grad: bool, passes=None):
    """conv (2 filters, 3×2, padding (1, 0, 1, 0)) → relu → 2×2 max pool on x (2, 1, 4, 5) holding a flat
    region (tied positive maxima after the ReLU, as on an image's blank border); the simplified graph of the
    gradients in w and b (and x), and its values in float64."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 1, 4, 5))
    x[0, 0, :3, :3] = 0.0
    w, bias = rng.normal(size=(2, 1, 3, 2)), np.array([0.3, -0.2])
    b = Builder("float64")
    xin, win, bin_ = b.input("x", x.shape), b.input("w", w.shape), b.input("b", bias.shape)
    z = b.op("conv", xin, win, bin_, **conv(1, (1, 0, 1, 0)))
    y = b.op("maxpool", b.op("relu", z), **window(2, 2))
    r = np.random.default_rng(9).normal(size=y.shape)
    f = b.op("reduce_sum", b.mul(y, b.const(r)), axes=None, keepdims=False, name="f")
    wrt = [win, bin_, xin] if x_needs_grad else [win, bin_]
    graph = simplify(b.graph("check", list(grad(b, f, wrt).values())))
    return graph, ReferenceEvaluator(to_onnx(graph, opset=17)).run(None, {"x": x, "w": w, "b": bias})


def test_first_layer_filter_gradient_skips_unpooling(monkeypatch):
    """conv → relu → tiling maxpool with no gradient to x: the filter gradient comes from the pooled
    gradient (`filter_grad_before_unpooling`) and the bias gradient sums it (`sum_before_unpooling`),
    so nothing is unpooled; the values equal those of the graph that unpools."""
    import compiler.simplify as simplify_module
    graph, fused = _conv_relu_pool_grads(x_needs_grad=False)
    ops = [n.op for n in graph.nodes]
    assert "conv_filter_grad_pooled" in ops and "maxpool_grad" not in ops and "conv_filter_grad" not in ops
    (bias_sum,) = [n for n in graph.nodes if n.op == "reduce_sum" and n.output in graph.outputs]
    assert bias_sum.inputs[0].shape == (2, 2, 2, 2)                         # the pooled gradient
    monkeypatch.setattr(simplify_module, "PASSES", tuple(p for p in simplify_module.PASSES if p not in (
        simplify_module.sum_before_unpooling, simplify_module.filter_grad_before_unpooling)))
    plain_graph, plain = _conv_relu_pool_grads(x_needs_grad=False)
    assert "maxpool_grad" in [n.op for n in plain_graph.nodes]
    for got, want in zip(fused, plain):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.abs(plain[0]).max() > 0.1


def test_filter_gradient_unpools_where_x_needs_its_gradient():
    """The same layers inside a network: the unpooled gradient also feeds conv_transpose, so the filter
    gradient keeps using it; the bias gradient still sums the pooled one."""
    graph, _ = _conv_relu_pool_grads(x_needs_grad=True)
    ops = [n.op for n in graph.nodes]
    assert "conv_filter_grad_pooled" not in ops and {"maxpool_grad", "conv_filter_grad", "conv_transpose"} <= set(ops)
    producers = graph.producers()
    (bias_sum,) = [n for n in graph.nodes if n.op == "reduce_sum" and n.output in graph.outputs]
    assert producers[bias_sum.inputs[0].name].op != "maxpool_grad"
