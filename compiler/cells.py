"""Recurrent cells in plain IR ops, unrolled over a window of static length (backpropagation through time).

`unroll` computes exactly what ONNX's RNN, GRU and LSTM ops compute (one direction, zero initial
state, no peepholes, no clipping), from the same tensors in the same layout, so the training graph
(unrolled) and the exported model (one ONNX op, any length) share their weights:

    W (1, G·H, F), R (1, G·H, H), B (1, 2·G·H) = [Wb, Rb], the G gate blocks in ONNX's order
    rnn   G = 1   h_t = act(x_t·Wᵀ + Wb + h_{t−1}·Rᵀ + Rb)
    gru   G = 3   gates z, r, h; linear_before_reset = 1 (PyTorch's convention):
                  z = σ(x·W_zᵀ + Wb_z + h·R_zᵀ + Rb_z),  r = σ(x·W_rᵀ + Wb_r + h·R_rᵀ + Rb_r)
                  h̃ = tanh(x·W_hᵀ + Wb_h + r ⊙ (h·R_hᵀ + Rb_h)),  h_t = (1 − z) ⊙ h̃ + z ⊙ h_{t−1}
    lstm  G = 4   gates i, o, f, c:  i, o, f = σ(·),  c̃ = tanh(·)
                  c_t = f ⊙ c_{t−1} + i ⊙ c̃,  h_t = o ⊙ tanh(c_t)

The input projection x·Wᵀ + Wb is one matrix product over all steps (m·T rows); the recurrence is
one `dense` per step. At t = 0 the state is zero, so h_{−1}·Rᵀ + Rb is Rb alone (no product).
Gates are column slices of the projections; their gradients meet again as one concat (see
`simplify.join_padded_pieces`).

The same code unrolls the recurrent layers of an exported model (`dlnc compile --recurrent
unrolled`). Either way the T steps are stacked by one `stack_steps`, emitted as a Concat and a
Reshape, ops that every tool converts.
"""
from __future__ import annotations

from typing import Callable

from .ir import Builder, Value

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
State = tuple[Value | None, Value | None]          # (h, c); None is the zero state


def _cols(b: Builder, x: Value, start: int, end: int) -> Value:
    """x[..., start:end]."""
    return b.op("slice_axis", x, axis=x.rank - 1, start=start, end=end)


def cell_rnn(b: Builder, xp: Value, hp: Value, state: State, hidden: int, activation: str) -> State:
    # h = act(x·Wᵀ + Wb + h·Rᵀ + Rb)
    return b.op(activation, b.add(xp, hp)), None


def cell_gru(b: Builder, xp: Value, hp: Value, state: State, hidden: int, activation: str) -> State:
    h_prev, _ = state
    H = hidden
    zr = b.op("sigmoid", b.add(_cols(b, xp, 0, 2 * H), _cols(b, hp, 0, 2 * H)))
    z, r = _cols(b, zr, 0, H), _cols(b, zr, H, 2 * H)
    candidate = b.op("tanh", b.add(_cols(b, xp, 2 * H, 3 * H), b.mul(r, _cols(b, hp, 2 * H, 3 * H))))
    # h = (1 − z) ⊙ h̃ + z ⊙ h_prev = h̃ + z ⊙ (h_prev − h̃);  with h_prev = 0: h̃ − z ⊙ h̃
    if h_prev is None:
        return b.sub(candidate, b.mul(z, candidate)), None
    return b.add(candidate, b.mul(z, b.sub(h_prev, candidate))), None


def cell_lstm(b: Builder, xp: Value, hp: Value, state: State, hidden: int, activation: str) -> State:
    _, c_prev = state
    H = hidden
    gates = b.add(xp, hp)
    iof = b.op("sigmoid", _cols(b, gates, 0, 3 * H))
    i, o, f = _cols(b, iof, 0, H), _cols(b, iof, H, 2 * H), _cols(b, iof, 2 * H, 3 * H)
    candidate = b.op("tanh", _cols(b, gates, 3 * H, 4 * H))
    c = b.mul(i, candidate) if c_prev is None else b.add(b.mul(f, c_prev), b.mul(i, candidate))
    return b.mul(o, b.op("tanh", c)), c


CELLS: dict[str, Callable[..., State]] = {"rnn": cell_rnn, "gru": cell_gru, "lstm": cell_lstm}


def unroll(b: Builder, cell: str, x: Value, w: Value, r: Value, bias: Value, *, activation: str = "tanh",
           last: bool = False, name: str | None = None) -> Value:
    """The output of ONNX's `cell` op over x (m, T, F) with T static: (m, T, H), or h_T (m, H) when `last`."""
    steps = x.shape[1]
    if not isinstance(steps, int):
        raise ValueError(f"unrolling a recurrent layer needs a static number of steps; got {x.shape}")
    gh = int(w.shape[1])
    hidden = gh // GATES[cell]
    w2, r2 = b.op("squeeze", w, axes=(0,)), b.op("squeeze", r, axes=(0,))
    biases = b.op("squeeze", bias, axes=(0,))
    wb, rb = _cols(b, biases, 0, gh), _cols(b, biases, gh, 2 * gh)
    # x·Wᵀ + Wb for every step at once: (m·T, F) → (m·T, G·H) → (m, T, G·H)
    projected = b.op("unfold_time", b.op("dense", b.op("fold_time", x), w2, wb), x)
    state: State = (None, None)
    outputs = []
    for t in range(steps):
        xp = b.op("time_step", projected, t=t)
        h_prev = state[0]
        hp = rb if h_prev is None else b.op("dense", h_prev, r2, rb)
        state = CELLS[cell](b, xp, hp, state, hidden, activation)
        outputs.append(state[0])
    if last:
        return b.op("identity", outputs[-1], name=name) if name else outputs[-1]
    return b.op("stack_steps", *outputs, name=name)      # y[:, t] = h_t
