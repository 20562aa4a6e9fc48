"""The training step: forward pass, cost, symbolic gradients, clipping, decay, optimiser update.

The whole step is one graph. Its inputs are the parameters, the optimiser state, the step
counter, the epoch, the hyperparameters (as scalars, so a search reuses the graph) and one
mini-batch; its outputs are the cost and, for every input it updates, `new.<name>`.

Cost, with m the mini-batch size:
    J = data loss (mean over the mini-batch) + λ/(2m)·Σ‖W‖² (l2) or λ/m·Σ|W| (l1)
Optimisers (the notes' forms; t counts steps from 1):
    sgd       W ← W − α·dW
    momentum  v ← β·v + (1 − β)·dW;              W ← W − α·v
    rmsprop   s ← β₂·s + (1 − β₂)·dW²;           W ← W − α·dW / (√s + ε)
    adam      v ← β₁·v + (1 − β₁)·dW;  s ← β₂·s + (1 − β₂)·dW²
              W ← W − α·(v / (1 − β₁ᵗ)) / (√(s / (1 − β₂ᵗ)) + ε)
The updates are written for few passes over each tensor (every op of the step graph reads and
writes whole tensors): averages as old + (1 − β)·(new − old), Adam's bias corrections folded
into two scalars per step (`adam_scalars`).
Decay of α by epoch (from 0):
    inverse α₀/(1 + rate·epoch), exponential α₀·rate^epoch, step α₀·factor^⌊epoch/every⌋
Clipping: g ← g · c / max(‖g‖, c) with ‖g‖ the global norm over all gradients.
"""
from __future__ import annotations

from typing import Callable

from dsl import ast

from .ir import Builder, Value
from .lower import LowerContext

# ---------------------------------------------------------------- losses
LOSSES_FOR_OUTPUT = {"binary": ("binary_cross_entropy", "mse"), "class": ("cross_entropy",), "real": ("mse",),
                     "tokens": ("cross_entropy",)}          # per step: compiler/lower_sequence.py
DEFAULT_LOSS = {"binary": "binary_cross_entropy", "class": "cross_entropy", "real": "mse", "tokens": "cross_entropy"}


def data_loss(ctx: LowerContext, last: ast.Dense, a: Value, y: Value, loss: str) -> Value:
    """The mean loss over the mini-batch, fused with the output activation where it is stable."""
    b = ctx.b
    z = ctx.pre_activation[last.name]
    if loss == "cross_entropy":
        return b.op("softmax_cross_entropy", z, y, name="data_loss")
    if loss == "binary_cross_entropy":
        return b.op("sigmoid_bce", b.op("squeeze", z, axes=(1,)), y, name="data_loss")
    prediction = b.op("squeeze", a, axes=(1,)) if ctx.program.output.kind == "binary" else a
    return b.op("mse", prediction, y, name="data_loss")


def regularization(ctx: LowerContext, reg: ast.Regularize, m: Value) -> Value:
    """λ/(2m)·Σ‖W‖² for l2, λ/m·Σ|W| for l1, over the regularised (weight) tensors."""
    b = ctx.b
    lam = ctx.hyperparameter("lambda", reg.lam)
    weights = [ctx.param_values[p.name] for p in ctx.params if p.regularized]
    terms = [b.op("reduce_sum", b.mul(w, w) if reg.kind == "l2" else b.op("abs", w), axes=None, keepdims=False)
             for w in weights]
    total = terms[0]
    for term in terms[1:]:
        total = b.add(total, term)
    scale = b.div(lam, b.mul(b.scalar(2.0), m)) if reg.kind == "l2" else b.div(lam, m)
    return b.mul(scale, total, name="regularization")


# ---------------------------------------------------------------- learning-rate decay
def decayed_lr(ctx: LowerContext, train: ast.Train) -> Value:
    b = ctx.b
    lr = ctx.hyperparameter("lr", train.optimizer.lr)
    decay = train.lr_decay
    if decay is None:
        return lr
    epoch = ctx.hyperparameter("epoch", 0.0)
    if decay.kind == "inverse":
        rate = ctx.hyperparameter("decay_rate", decay.rate)
        return b.div(lr, b.add(b.scalar(1.0), b.mul(rate, epoch)), name="alpha")
    if decay.kind == "exponential":
        rate = ctx.hyperparameter("decay_rate", decay.rate)
        return b.mul(lr, b.op("pow", rate, epoch), name="alpha")
    every = ctx.hyperparameter("decay_every", decay.every)
    factor = ctx.hyperparameter("decay_factor", decay.factor)
    return b.mul(lr, b.op("pow", factor, b.op("floor", b.div(epoch, every))), name="alpha")


def clip_by_global_norm(ctx: LowerContext, grads: dict[str, Value], clip: float) -> dict[str, Value]:
    b = ctx.b
    c = ctx.hyperparameter("clip_norm", clip)
    squares = [b.op("reduce_sum", b.mul(g, g), axes=None, keepdims=False) for g in grads.values()]
    total = squares[0]
    for s in squares[1:]:
        total = b.add(total, s)
    scale = b.div(c, b.op("maximum", b.op("sqrt", total), c), name="clip_scale")
    return {name: b.mul(g, scale) for name, g in grads.items()}


# ---------------------------------------------------------------- optimisers
# A rule gets the context, the parameter, its gradient, α, the step t (from 1) and a function
# that makes a state slot; it returns the new parameter and {slot input: new slot value}.
Slot = Callable[[str], Value]


def update_sgd(ctx, w, g, alpha, t, slot):
    return ctx.b.sub(w, ctx.b.mul(alpha, g)), {}


def _average(b: Builder, old: Value, new: Value, beta: Value) -> Value:
    """β·old + (1 − β)·new, the exponentially weighted average, as old + (1 − β)·(new − old):
    three passes over the tensor, with (1 − β) a scalar."""
    return b.add(old, b.mul(b.sub(b.scalar(1.0), beta), b.sub(new, old)))


def update_momentum(ctx, w, g, alpha, t, slot):
    b, beta = ctx.b, ctx.hyperparameter("beta", ctx.program.train.optimizer.beta)
    v = slot("v")
    v_new = _average(b, v, g, beta)
    return b.sub(w, b.mul(alpha, v_new)), {v.name: v_new}


def update_rmsprop(ctx, w, g, alpha, t, slot):
    b, opt = ctx.b, ctx.program.train.optimizer
    beta2, eps = ctx.hyperparameter("beta2", opt.beta2), ctx.hyperparameter("eps", opt.eps)
    s = slot("s")
    s_new = _average(b, s, b.mul(g, g), beta2)
    step = b.div(g, b.add(b.op("sqrt", s_new), eps))
    return b.sub(w, b.mul(alpha, step)), {s.name: s_new}


def adam_scalars(ctx, alpha: Value, t: Value) -> tuple[Value, Value]:
    """The bias corrections folded into two scalars (common-subexpression elimination leaves one
    copy for all tensors):
        α·(v/(1 − β₁ᵗ)) / (√(s/(1 − β₂ᵗ)) + ε) = c·v / (√s + ε̂),
        c = α·√(1 − β₂ᵗ)/(1 − β₁ᵗ),   ε̂ = ε·√(1 − β₂ᵗ)."""
    b, opt = ctx.b, ctx.program.train.optimizer
    beta1, beta2 = ctx.hyperparameter("beta1", opt.beta1), ctx.hyperparameter("beta2", opt.beta2)
    eps = ctx.hyperparameter("eps", opt.eps)
    one = b.scalar(1.0)
    root2 = b.op("sqrt", b.sub(one, b.op("pow", beta2, t)))
    c = b.div(b.mul(alpha, root2), b.sub(one, b.op("pow", beta1, t)))
    return c, b.mul(eps, root2)


def update_adam(ctx, w, g, alpha, t, slot):
    # v ← v + (1 − β₁)(g − v); s ← s + (1 − β₂)(g² − s); W ← W − c·v / (√s + ε̂): 12 passes
    b, opt = ctx.b, ctx.program.train.optimizer
    beta1, beta2 = ctx.hyperparameter("beta1", opt.beta1), ctx.hyperparameter("beta2", opt.beta2)
    v, s = slot("v"), slot("s")
    v_new, s_new = _average(b, v, g, beta1), _average(b, s, b.mul(g, g), beta2)
    c, eps_hat = adam_scalars(ctx, alpha, t)
    step = b.div(v_new, b.add(b.op("sqrt", s_new), eps_hat))
    return b.sub(w, b.mul(c, step)), {v.name: v_new, s.name: s_new}


OPTIMIZERS = {"sgd": update_sgd, "momentum": update_momentum, "rmsprop": update_rmsprop, "adam": update_adam}
