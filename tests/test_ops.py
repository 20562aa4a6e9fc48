"""Every IR op: table completeness, and its gradient against float64 central differences.

Each case builds f = Σ r ⊙ op(inputs) for a fixed random r, differentiates it with the
compiler's reverse mode, emits ONNX in float64 and runs it in onnx.reference. The analytic
directional derivative ⟨∇f, v⟩ must match (f(x + h v) − f(x − h v)) / 2h in a random
direction v. The same graph then runs in ONNX Runtime (float64) and must agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    Case("matmul", ((3, 4), (4, 5)), id="matmul-nn"),
    Case("matmul", ((4, 3), (4, 5)), {"trans_a": 1}, id="matmul-tn"),
    Case("matmul", ((3, 4), (5, 4)), {"trans_b": 1}, id="matmul-nt"),
    Case("matmul", ((4, 3), (5, 4)), {"trans_a": 1, "trans_b": 1}, id="matmul-tt"),
    Case("reduce_sum", ((3, 4),), {"axes": (0,), "keepdims": False}, id="reduce_sum-0"),
    Case("reduce_sum", ((3, 4),), {"axes": None, "keepdims": False}, id="reduce_sum-all"),
    Case("reduce_mean", (("N", 4),), {"axes": (0,), "keepdims": True}, id="reduce_mean-batch"),
    Case("reduce_mean", ((3, 4),), {"axes": (1,), "keepdims": False}, id="reduce_mean-1"),
    Case("unsqueeze", ((3, 4),), {"axes": (1,)}),
    Case("squeeze", ((3, 1),), {"axes": (1,)}),
    Case("reshape_as", ((3, 4),), extra=(np.zeros((2, 6)),)),
    Case("expand_as", ((1, 4),), extra=(np.zeros((3, 4)),)),
    Case("flatten", ((3, 2, 2),)),
    Case("softmax_cross_entropy", (("N", 4),), extra=(labels(3, 4),)),
    Case("sigmoid_bce", (("N", 1),), extra=(np.array([[1.0], [0.0], [1.0]]),)),
    Case("mse", (("N", 2),), extra=(np.arange(6.0).reshape(3, 2) / 6,)),
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


def build(case: Case):
    b = Builder("float64")
    xs = [b.input(f"x{i}", s) for i, s in enumerate(case.shapes)]
    batch = ("N",) if case.shapes[0][0] == "N" else ()
    consts = [b.input(f"e{i}", batch + e.shape[len(batch):], dtype=str(e.dtype)) for i, e in enumerate(case.extra)]
    if case.op == "where":
        args = [consts[0], *xs]
    else:
        args = [*xs, *consts]
    y = b.op(case.op, *args, **case.attrs)
    r = b.const(np.random.default_rng(1).normal(size=_concrete(y.shape)))
    f = b.op("reduce_sum", b.mul(y, r), axes=None, keepdims=False, name="f")
    grads = grad(b, f, xs)
    graph = simplify(b.graph("check", [f, *grads.values()]))
    return to_onnx(graph, opset=17), [x.name for x in xs]


def extra_feeds(case: Case):
    return {f"e{i}": e for i, e in enumerate(case.extra)}


def draw(case: Case, rng):
    out = []
    for s in case.shapes:
        x = rng.normal(size=_concrete(s))
        out.append(np.abs(x) + 0.5 if case.positive else x)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id or c.op)
def test_gradient_matches_central_differences(case):
    rng = np.random.default_rng(0)
    model, names = build(case)
    onnx.checker.check_model(model, full_check=True)
    run = ReferenceEvaluator(model)
    xs = draw(case, rng)
    feeds = dict(zip(names, xs)) | extra_feeds(case)
    f, *grads = run.run(None, feeds)
    v = [rng.normal(size=x.shape) for x in xs]
    h = 1e-6
    plus = run.run(["f"], {n: x + h * d for n, x, d in zip(names, xs, v)} | extra_feeds(case))[0]
    minus = run.run(["f"], {n: x - h * d for n, x, d in zip(names, xs, v)} | extra_feeds(case))[0]
    numeric = (plus - minus) / (2 * h)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, v))
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id or c.op)
def test_onnxruntime_agrees_with_reference(case):
    import onnxruntime as ort
    model, names = build(case)
    xs = draw(case, np.random.default_rng(2))
    feeds = dict(zip(names, xs)) | extra_feeds(case)
    expected = ReferenceEvaluator(model).run(None, feeds)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
