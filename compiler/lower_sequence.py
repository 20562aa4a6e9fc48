"""Lowering of token inputs and sequence layers: embed, one_hot, rnn/gru/lstm, last, and dense per step.

Imported at the bottom of `compiler.lower`: it registers its rules into `lower.LOWER_RULES`
(`dense` included: on a sequence it applies at every step, otherwise it is lower's own rule) and
registers its layer kinds in `lower.LOWER_RULES`.

Layouts are batch-first. A `tokens` input is (N, T) int64 ids; `embed D` and `one_hot` make it
(N, T, D) and (N, T, V); a recurrent layer gives (N, T, H), or (N, H) with `last`; a `last` layer
keeps the last step; `dense` on a sequence runs at every step (fold (N, T, F) to (N·T, F), one
Gemm, unfold). T is the training window in the training graph, where each recurrent layer is
unrolled into plain ops (`compiler.cells`: backpropagation through time), and the symbol "T" in
the exported model, where it is one ONNX RNN, GRU or LSTM op that takes any length — unless the
model is exported with `--recurrent unrolled` (`ctx.recurrent`): then it is unrolled as in training,
over the same static T, into plain ops that every tool runs (no RNN/GRU/LSTM op; the input length
is fixed at T).

Parameters, in the layouts of the ONNX ops so the exported model reads the trained tensors as they are:
    embed_1.E  (V, D)         N(0, 1), as torch.nn.Embedding; not regularised
    gru_2.W    (1, G·H, F)    input weights, the G gate blocks in ONNX's order (z, r, h; i, o, f, c)
    gru_2.R    (1, G·H, H)    recurrent weights
    gru_2.B    (1, 2·G·H)     the biases [Wb, Rb], zeros
W and R are Xavier, N(0, 1/fan_in) (He, 2/fan_in, for `rnn UNITS relu`), with fan_in F for W and H
for R; both are regularised (they are weights), B is not.

Per-step loss (`output y: tokens per_step`): J = (1/m) Σ_i Σ_t −log p(y_it), the cross-entropy
summed over the steps and averaged over the examples: T times the mean over the m·T predictions.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dsl import ast

from .cells import GATES, unroll
from .ir import Value
from .lower import ACTIVATIONS, LOWER_RULES, LayerInfo, LowerContext, describe, error, init_weights

DEFAULT_VOCAB = 64          # `vocab` before the data is read (dlnc check, the first compile of dlnc run)
DEFAULT_STEPS = 32          # the training window T of text data without `sequence_length`


def token_sizes(program: ast.Program, vocab_size: int = 0, steps: int | None = None) -> tuple[int, int | None]:
    """(V, T): the vocabulary size (0 for a program without tokens) and the training window.

    Given by the data (`vocab_size` of the vocabulary it read, `steps` its window); before the data
    is read, what the data block declares (`vocab_size`, `sequence_length`), else placeholders.
    A float sequence input `float[T, F]` has its T in its shape."""
    if "tokens" not in (program.input.kind, program.output.kind):
        return 0, None
    data = program.data
    vocab = vocab_size or (data.vocab_size if data is not None and data.vocab_size else DEFAULT_VOCAB)
    if program.input.kind != "tokens":
        return vocab, (program.input.shape[0] if program.input.shape else None)
    declared = data.sequence_length if data is not None and data.sequence_length else DEFAULT_STEPS
    return vocab, steps or declared


def check_token_input(program: ast.Program) -> None:
    """A `tokens` input holds ids: the first layer must turn them into vectors."""
    if program.input.kind == "tokens" and program.layers and not isinstance(program.layers[0], (ast.Embed, ast.OneHot)):
        first = program.layers[0]
        raise error(f"input {program.input.name}: tokens gives token ids (N, T); the first layer must turn them "
                    f"into vectors — write `embed DIM` (a learned table) or `one_hot` before {first.name}",
                    first.span, program)


def unrolled(ctx: LowerContext) -> bool:
    """Whether recurrent layers become plain ops over a static T: in training, and in a model
    exported with `--recurrent unrolled`."""
    return ctx.training or ctx.recurrent == "unrolled"


def _steps(ctx: LowerContext, a: Value) -> int:
    """T for FLOP counts: the static length, else the training window."""
    return a.shape[1] if isinstance(a.shape[1], int) else (ctx.steps or 1)


def _token_ids(ctx: LowerContext, layer: ast.Layer, a: Value, kind: str) -> None:
    if a.dtype != "int64" or a.rank != 2:
        raise error(f"{layer.name} ({kind}) takes the token ids (N, T) of a `tokens` input, but its input is "
                    f"{describe(a.shape)}; write it first, right after the input", layer.span, ctx.program)


def _sequence(ctx: LowerContext, layer: ast.Layer, a: Value, kind: str) -> None:
    if a.dtype == "int64":
        raise error(f"{layer.name} ({kind}) needs vectors, but its input is token ids {describe(a.shape)}; "
                    f"write `embed DIM` or `one_hot` before it", layer.span, ctx.program)
    if a.rank != 3:
        raise error(f"{layer.name} ({kind}) takes a sequence (N, T, features) but its input is {describe(a.shape)}"
                    + ("; it already has one vector per example (a `last` before it?)" if a.rank == 2 else ""),
                    layer.span, ctx.program)


def vocab_size(ctx: LowerContext, layer: ast.Layer) -> int:
    if ctx.vocab < 1:
        raise error("`vocab` is the vocabulary size of token data, and this program has no tokens input or "
                    "output; write the number", layer.spans.get("units", layer.span), ctx.program)
    return ctx.vocab


# ---------------------------------------------------------------- layer rules
def lower_embed(ctx: LowerContext, layer: ast.Embed, a: Value) -> Value:
    """A[n, t] = E[x[n, t]]: one learned row of E (V, D) per token id."""
    _token_ids(ctx, layer, a, "embed")
    vocab = vocab_size(ctx, layer)
    table = ctx.param(layer, "E", ctx.rng.normal(0.0, 1.0, size=(vocab, layer.dim)), False)
    out = ctx.b.op("embedding", table, a, name=layer.name)
    ctx.infos.append(LayerInfo(layer.name, "embed", ((table.name, table.shape),), out.shape, 0))
    return out


def lower_one_hot(ctx: LowerContext, layer: ast.OneHot, a: Value) -> Value:
    """A[n, t, k] = 1 where x[n, t] = k, else 0 (V wide)."""
    _token_ids(ctx, layer, a, "one_hot")
    out = ctx.b.op("one_hot", a, depth=vocab_size(ctx, layer), dtype=ctx.b.dtype, name=layer.name)
    ctx.infos.append(LayerInfo(layer.name, "one_hot", (), out.shape, 0))
    return out


def lower_recurrent(ctx: LowerContext, layer: ast.Recurrent, a: Value) -> Value:
    """rnn / gru / lstm over the sequence: unrolled in training (and in a model exported with
    `--recurrent unrolled`), otherwise one ONNX op in the exported model."""
    cell = layer.cell
    _sequence(ctx, layer, a, cell)
    features, hidden, gates = int(a.shape[2]), layer.units, GATES[cell]
    activation = layer.activation if cell == "rnn" else "tanh"
    w = ctx.param(layer, "W", init_weights(ctx.rng, (1, gates * hidden, features), features, activation), True)
    r = ctx.param(layer, "R", init_weights(ctx.rng, (1, gates * hidden, hidden), hidden, activation), True)
    bias = ctx.param(layer, "B", np.zeros((1, 2 * gates * hidden)), False)
    if unrolled(ctx):
        out = unroll(ctx.b, cell, a, w, r, bias, activation=activation, last=layer.last, name=layer.name)
    else:
        out = ctx.b.op(f"{cell}_seq", a, w, r, bias, hidden=hidden, last=layer.last, activation=activation,
                       name=layer.name)
    # per step: 2 per multiply-add of x·Wᵀ and h·Rᵀ
    flops = _steps(ctx, a) * 2 * gates * hidden * (features + hidden)
    ctx.infos.append(LayerInfo(layer.name, cell, tuple((p.name, p.shape) for p in (w, r, bias)), out.shape, flops))
    return out


def lower_last(ctx: LowerContext, layer: ast.Last, a: Value) -> Value:
    """A = x[:, T − 1]: the last step of the sequence."""
    _sequence(ctx, layer, a, "last")
    out = ctx.b.op("time_step", a, t=-1, name=layer.name)
    ctx.infos.append(LayerInfo(layer.name, "last", (), out.shape, 0))
    return out


_lower_dense_vectors = LOWER_RULES[ast.Dense]


def _check_output_rank(ctx: LowerContext, layer: ast.Dense, a: Value) -> None:
    """The output layer sees a sequence exactly when the output is per step."""
    out, per_step = ctx.program.output, ctx.program.output.kind == "tokens"
    if per_step and a.rank != 3:
        raise error(f"output {out.name}: tokens per_step predicts a token at every step, but {layer.name} gets "
                    f"{describe(a.shape)}, one vector per example; drop the `last` before it",
                    layer.span, ctx.program)
    if not per_step and a.rank == 3:
        raise error(f"output {out.name}: {out.kind} predicts one label per example, but {layer.name} gets a sequence "
                    f"{describe(a.shape)}; keep its last step: end the recurrent layer with `last` (like `gru 64 "
                    f"last`) or write a `last` layer before {layer.name}", layer.span, ctx.program)


def lower_dense(ctx: LowerContext, layer: ast.Dense, a: Value) -> Value:
    """`dense` on vectors (lower's rule), or at every step of a sequence; `dense vocab` is V units."""
    if a.dtype == "int64":
        raise error(f"{layer.name} (dense) needs vectors, but its input is token ids {describe(a.shape)}; write "
                    f"`embed DIM` or `one_hot` before it", layer.span, ctx.program)
    if ctx.program.layers and layer is ctx.program.layers[-1]:
        _check_output_rank(ctx, layer, a)
    if layer.units == "vocab":
        layer = replace(layer, units=vocab_size(ctx, layer))
    if a.rank != 3:
        return _lower_dense_vectors(ctx, layer, a)
    return lower_dense_steps(ctx, layer, a)


def lower_dense_steps(ctx: LowerContext, layer: ast.Dense, a: Value) -> Value:
    """Z = A·Wᵀ + b at every step: (N, T, F) folded to (N·T, F), one Gemm, unfolded to (N, T, units)."""
    b = ctx.b
    units, n_in = int(layer.units), int(a.shape[2])
    w = ctx.param(layer, "W", init_weights(ctx.rng, (units, n_in), n_in, layer.activation.kind), True)
    bias = ctx.param(layer, "b", np.zeros(units), False)
    z = b.op("dense", b.op("fold_time", a), w, bias, name=f"{layer.name}.Z")
    ctx.pre_activation[layer.name] = z                  # (N·T, units): the per-step loss reads the logits here
    activated = ACTIVATIONS[layer.activation.kind](b, z, layer.activation, f"{layer.name}.A")
    out = b.op("unfold_time", activated, a, name=layer.name)
    ctx.infos.append(LayerInfo(layer.name, "dense", ((w.name, w.shape), (bias.name, bias.shape)), out.shape,
                               _steps(ctx, a) * (2 * n_in * units + units)))
    return out


# ---------------------------------------------------------------- the per-step loss
def sequence_loss(ctx: LowerContext, last: ast.Dense, y: Value) -> Value:
    """J = (1/m) Σ_i Σ_t −log softmax(z_it)[y_it] = T · (mean over the m·T steps), z the per-step logits."""
    b = ctx.b
    z = ctx.pre_activation[last.name]
    mean = b.op("softmax_cross_entropy", z, b.op("fold_time", y))
    return b.mul(mean, b.scalar(float(y.shape[1])), name="data_loss")


LOWER_RULES.update({ast.Embed: lower_embed, ast.OneHot: lower_one_hot, ast.Recurrent: lower_recurrent,
                    ast.Last: lower_last, ast.Dense: lower_dense})
