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
The updates are written for few passes over each tensor (see the optimisers' section): the
backward pass delivers gradients already scaled by (1 − β), Adam keeps its second moment scaled,
and its bias corrections are folded into two scalars per step (`adam_scalars`).
Decay of α by epoch (from 0):
    inverse α₀/(1 + rate·epoch), exponential α₀·rate^epoch, step α₀·factor^⌊epoch/every⌋
Clipping: g ← g · c / max(‖g‖, c) with ‖g‖ the global norm over all gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from dsl import ast

from .ir import Value
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


def clip_by_global_norm(ctx: LowerContext, g: Value, clip: float, scale: Value | None = None) -> Value:
    """g ← g·c/max(‖g‖, c), g every gradient joined into one vector. With gradients that arrive
    scaled, g' = a·g, the same clip is g' ← g'·(a·c)/max(‖g'‖, a·c)."""
    b = ctx.b
    c = ctx.hyperparameter("clip_norm", clip)
    if scale is not None:
        c = b.mul(scale, c)
    norm = b.op("sqrt", b.op("reduce_sum", b.mul(g, g), axes=None, keepdims=False))
    return b.mul(g, b.div(c, b.op("maximum", norm, c), name="clip_scale"))


# ---------------------------------------------------------------- optimisers
# Every op of the step graph reads and writes whole tensors, and the update is memory-bound,
# so its cost is the number of passes over each parameter. Two things cut them:
#   - the backward pass is seeded with a scalar a instead of 1 (`gradient_scale`), so every
#     gradient arrives as g' = a·dW for free: a multiplies the loss's scalar seed, never a
#     tensor. With a = 1 − β, the average β·v + (1 − β)·dW is β·v + g': two passes, not three;
#   - a moment may be kept scaled by a per-step scalar, so that its update needs no multiply
#     of g'. The scale is itself state, so a β changed mid-run (`dlnc tune`) rescales exactly.
# A rule gets the context, the parameters, their scaled gradient g', α, the step t (from 1) and
# the optimiser's `Slots`; it returns the new parameters and {state input: new value}. It is
# called once, on every trainable parameter flattened into one vector (`build_train_step`), so
# each of its ops is one pass over all of them.
#
# dlnc's runner runs a folded form of the rules with moments (FOLDED_OPTIMIZERS): one moment
# M ← d·M + g'ᵖ (d its decay; p = 1 for a mean, 2 for a mean square) is kept as B·M, with B a
# scalar state that grows as B ← B/d, so that its update is B·M ← B·M + (B^(1/p)·g')ᵖ: the
# decay's pass over the parameters is gone, and B^(1/p) reaches the gradients through the seed,
# for free. Another moment is then kept as B^(1/p)·M (Adam's mean, beside its mean square). The
# exported step (OPTIMIZERS) keeps every decay: B grows without bound, and only the runner
# brings it back (`Folding`).
@dataclass(frozen=True)
class Slots:
    """The optimiser state a rule asks for: `tensor(role)` is a slot shaped like the parameter
    vector (`params.<role>`), `scalar(name, init)` one scalar."""
    tensor: Callable[[str], Value]
    scalar: Callable[[str, float], Value]


MOMENT_SCALE = "moments.scale"    # B, the scalar state of a folded rule (1 at the start)
# A decay under this (a β of 0, say) is this in a folded rule: B/d stays finite, and the moment keeps
# at most this much of its old value where the exported step keeps none. The runner runs the
# exported step for a program whose β is that small (`Folding.decay`); only a β set that small
# mid-run (`dlnc tune`, a search's trial on a shared session) meets the bound.
MIN_DECAY = 2.0 ** -20


@dataclass(frozen=True)
class Folding:
    """How a folded rule keeps its moments: the slot `name` holds B^power times the exported
    step's value, B being the state MOMENT_SCALE. Where B = 1 the two steps' states are the same;
    the runner brings B back to 1 (M ← M/B^power) before B can overflow and before it hands out
    or takes in values. `decay`: the hyperparameter that B grows by the inverse of."""
    powers: Mapping[str, float]
    decay: str


@dataclass(frozen=True)
class Optimizer:
    """One optimiser: its update rule, the scale its gradients arrive with, and, for a folded
    rule, how its moments are kept."""
    update: Callable                                          # (ctx, w, g', α, t, slots) -> (W', {slot: new})
    gradient_scale: Callable[[LowerContext, Slots], Value] | None = None   # a, with g' = a·dW; None: a = 1
    folding: Folding | None = None


def update_sgd(ctx, w, g, alpha, t, slots):
    # W ← W − α·dW: 2 passes
    return ctx.b.sub(w, ctx.b.mul(alpha, g)), {}


def moment_scale(ctx, slots: Slots, decay: Value) -> tuple[Value, Value, Value]:
    """(B, B/d, d): the folded moments' scale before and after this step, and their decay d as
    the folded rule uses it, at least MIN_DECAY so that B/d stays finite."""
    scale = slots.scalar(MOMENT_SCALE, 1.0)
    decay = ctx.b.op("maximum", decay, ctx.b.scalar(MIN_DECAY))
    return scale, ctx.b.div(scale, decay), decay


def momentum_scale(ctx, slots=None) -> Value:
    return ctx.b.sub(ctx.b.scalar(1.0), ctx.hyperparameter("beta", ctx.program.train.optimizer.beta))


def update_momentum(ctx, w, g, alpha, t, slots):
    # g' = (1 − β)·dW;  v ← β·v + g';  W ← W − α·v: 4 passes
    b, beta = ctx.b, ctx.hyperparameter("beta", ctx.program.train.optimizer.beta)
    v = slots.tensor("v")
    v_new = b.add(b.mul(beta, v), g)
    return b.sub(w, b.mul(alpha, v_new)), {v.name: v_new}


def momentum_folded_scale(ctx, slots) -> Value:
    # G = B·g' with B ← B/β
    beta = ctx.hyperparameter("beta", ctx.program.train.optimizer.beta)
    return ctx.b.mul(momentum_scale(ctx), moment_scale(ctx, slots, beta)[1])


def update_momentum_folded(ctx, w, g, alpha, t, slots):
    # V = B·v:  V ← B·(β·v + g') = V + G;  W ← W − (α/B)·V: 3 passes
    b = ctx.b
    beta = ctx.hyperparameter("beta", ctx.program.train.optimizer.beta)
    scale, scale_new, _ = moment_scale(ctx, slots, beta)
    v = slots.tensor("v")
    v_new = b.add(v, g)
    return b.sub(w, b.mul(b.div(alpha, scale_new), v_new)), {v.name: v_new, scale.name: scale_new}


def rmsprop_scale(ctx, slots=None) -> Value:
    beta2 = ctx.hyperparameter("beta2", ctx.program.train.optimizer.beta2)
    return ctx.b.op("sqrt", ctx.b.sub(ctx.b.scalar(1.0), beta2))


def update_rmsprop(ctx, w, g, alpha, t, slots):
    # g' = √(1 − β₂)·dW;  s ← β₂·s + g'²;  W ← W − α·dW/(√s + ε) = W − (α/√(1 − β₂))·g'/(√s + ε): 8 passes
    b, opt = ctx.b, ctx.program.train.optimizer
    beta2, eps = ctx.hyperparameter("beta2", opt.beta2), ctx.hyperparameter("eps", opt.eps)
    s = slots.tensor("s")
    s_new = b.add(b.mul(beta2, s), b.mul(g, g))
    step = b.div(g, b.add(b.op("sqrt", s_new), eps))
    return b.sub(w, b.mul(b.div(alpha, rmsprop_scale(ctx)), step)), {s.name: s_new}


def rmsprop_folded_scale(ctx, slots) -> Value:
    # G = √B·g' with B ← B/β₂
    beta2 = ctx.hyperparameter("beta2", ctx.program.train.optimizer.beta2)
    return ctx.b.mul(rmsprop_scale(ctx), ctx.b.op("sqrt", moment_scale(ctx, slots, beta2)[1]))


def update_rmsprop_folded(ctx, w, g, alpha, t, slots):
    # S = B·s:  S ← B·(β₂·s + g'²) = S + G²;
    # W ← W − (α/√(1 − β₂))·g'/(√s + ε) = W − (α/√(1 − β₂))·G/(√S + ε·√B): 7 passes
    b, opt = ctx.b, ctx.program.train.optimizer
    beta2, eps = ctx.hyperparameter("beta2", opt.beta2), ctx.hyperparameter("eps", opt.eps)
    scale, scale_new, _ = moment_scale(ctx, slots, beta2)
    s = slots.tensor("s")
    s_new = b.add(s, b.mul(g, g))
    step = b.div(g, b.add(b.op("sqrt", s_new), b.mul(eps, b.op("sqrt", scale_new))))
    return b.sub(w, b.mul(b.div(alpha, rmsprop_scale(ctx)), step)), {s.name: s_new, scale.name: scale_new}


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


def adam_scale(ctx, slots=None) -> Value:
    return ctx.b.sub(ctx.b.scalar(1.0), ctx.hyperparameter("beta1", ctx.program.train.optimizer.beta1))


def adam_moment_scale(ctx) -> Value:
    """k = (1 − β₂)/(1 − β₁)²: Adam keeps ŝ = s/k, so that ŝ ← β₂·ŝ + g'² with g' = (1 − β₁)·dW."""
    b, opt = ctx.b, ctx.program.train.optimizer
    one = b.scalar(1.0)
    a = b.sub(one, ctx.hyperparameter("beta1", opt.beta1))
    return b.div(b.sub(one, ctx.hyperparameter("beta2", opt.beta2)), b.mul(a, a))


def adam_decay(ctx, slots) -> tuple[Value, Value, Value]:
    """(k, k_prev, d): ŝ's decay d = β₂·k_prev/k, with k_prev, the k the stored ŝ was scaled by,
    scalar state (exact when β changes)."""
    opt = ctx.program.train.optimizer
    k = adam_moment_scale(ctx)
    k_prev = slots.scalar("adam.k", (1 - opt.beta2) / (1 - opt.beta1) ** 2)
    beta2 = ctx.hyperparameter("beta2", opt.beta2)
    return k, k_prev, ctx.b.mul(beta2, ctx.b.div(k_prev, k))


def adam_step(ctx, w, v, s, alpha, t, k, eps_scale: Value | None = None) -> Value:
    # W ← W − c·v/(√s + ε̂) = W − (c/√k)·v/(√ŝ + ε̂/√k), v and ŝ both scaled by a (√B, B)
    # or not: W − (c/√k)·a·v/(√(a²·ŝ) + a·ε̂/√k)                                    (5 passes)
    b = ctx.b
    c, eps_hat = adam_scalars(ctx, alpha, t)
    root_k = b.op("sqrt", k)
    eps = b.div(eps_hat if eps_scale is None else b.mul(eps_hat, eps_scale), root_k)
    return b.sub(w, b.mul(b.div(c, root_k), b.div(v, b.add(b.op("sqrt", s), eps))))


def update_adam(ctx, w, g, alpha, t, slots):
    # g' = (1 − β₁)·dW, so v ← β₁·v + (1 − β₁)·dW is v ← β₁·v + g'               (2 passes)
    # ŝ = s/k with k = (1 − β₂)/(1 − β₁)²: ŝ ← β₂·(k_prev/k)·ŝ + g'²              (3 passes)
    b = ctx.b
    beta1 = ctx.hyperparameter("beta1", ctx.program.train.optimizer.beta1)
    k, k_prev, decay = adam_decay(ctx, slots)
    v, s = slots.tensor("v"), slots.tensor("s")
    v_new = b.add(b.mul(beta1, v), g)
    s_new = b.add(b.mul(decay, s), b.mul(g, g))
    return adam_step(ctx, w, v_new, s_new, alpha, t, k), {v.name: v_new, s.name: s_new, k_prev.name: k}


def adam_folded_scale(ctx, slots) -> Value:
    # G = √B·g' with B ← B/d, d ŝ's decay
    return ctx.b.mul(adam_scale(ctx), ctx.b.op("sqrt", moment_scale(ctx, slots, adam_decay(ctx, slots)[2])[1]))


def update_adam_folded(ctx, w, g, alpha, t, slots):
    # S = B·ŝ:  S ← B·(d·ŝ + g'²) = S + G²                                          (2 passes)
    # V = √B·v: V ← √B·(β₁·v + g') = (β₁/√d)·V + G                                 (2 passes)
    b = ctx.b
    beta1 = ctx.hyperparameter("beta1", ctx.program.train.optimizer.beta1)
    k, k_prev, decay = adam_decay(ctx, slots)
    scale, scale_new, decay = moment_scale(ctx, slots, decay)
    v, s = slots.tensor("v"), slots.tensor("s")
    v_new = b.add(b.mul(b.div(beta1, b.op("sqrt", decay)), v), g)
    s_new = b.add(s, b.mul(g, g))
    step = adam_step(ctx, w, v_new, s_new, alpha, t, k, eps_scale=b.op("sqrt", scale_new))
    return step, {v.name: v_new, s.name: s_new, k_prev.name: k, scale.name: scale_new}


OPTIMIZERS = {"sgd": Optimizer(update_sgd), "momentum": Optimizer(update_momentum, momentum_scale),
              "rmsprop": Optimizer(update_rmsprop, rmsprop_scale), "adam": Optimizer(update_adam, adam_scale)}
FOLDED_OPTIMIZERS = {
    "momentum": Optimizer(update_momentum_folded, momentum_folded_scale, Folding({"params.v": 1.0}, "beta")),
    "rmsprop": Optimizer(update_rmsprop_folded, rmsprop_folded_scale, Folding({"params.s": 1.0}, "beta2")),
    "adam": Optimizer(update_adam_folded, adam_folded_scale, Folding({"params.s": 1.0, "params.v": 0.5}, "beta2"))}
