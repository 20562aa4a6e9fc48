"""Compile a typed program into its two ONNX models: inference and training step.

`compile_program` is the compiler's entry point. It lowers the layers twice from the same
seed (inference, training), builds the training step around the training forward pass,
simplifies both graphs, emits them, and checks them with the ONNX checker and strict shape
inference.

Recurrent layers are exported as one ONNX RNN/GRU/LSTM op each (`recurrent="op"`, any length T),
or, with `recurrent="unrolled"` (`dlnc compile --recurrent unrolled`), unrolled over the training
window T into the plain ops of the training graph (`compiler.cells`), for tools that lack those
ops or their options; the input is then (N, T) with T static, recorded in the metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
import onnx

from dsl import ast

from . import __version__
from .autodiff import grad
from .emit import DEFAULT_OPSET, resolve_target, to_onnx
from .ir import Builder, Graph, Value
from .lower import (LayerInfo, LowerContext, Normalization, ParamSpec, StateSpec, error, feature_major_layers,
                    lower_network)
from .lower_sequence import check_token_input, sequence_loss, token_sizes, unrolled
from .simplify import simplify
from .train import (DEFAULT_LOSS, FOLDED_OPTIMIZERS, LOSSES_FOR_OUTPUT, MOMENT_SCALE, OPTIMIZERS, Folding, Slots,
                    clip_by_global_norm, data_loss, decayed_lr, regularization)

RECURRENT_LOWERINGS = ("op", "unrolled")      # `dlnc compile --recurrent`: one ONNX op per layer, or plain ops


FLAT = "params"     # the training step's input of every trainable parameter, flattened and joined: (1, n)


@dataclass(frozen=True)
class FlatView:
    """A trainable parameter as the training step takes it: elements offset … offset + size of
    the flat `params` input (one row), shaped. The caller binds it as a view of that input."""
    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def of(self, flat: np.ndarray) -> np.ndarray:
        """This parameter in an array laid out as FLAT (any shape, C order): a view, shaped."""
        return flat.reshape(-1)[self.offset:self.offset + self.size].reshape(self.shape)


@dataclass(frozen=True)
class TrainStepSpec:
    params: tuple[ParamSpec, ...]
    trainable: tuple[str, ...]
    state: tuple[StateSpec, ...]
    hyper: Mapping[str, float]            # scalar inputs and the program's values for them
    x: str
    y: str
    noise: tuple[tuple[str, tuple], ...]  # dropout noise inputs, U(0, 1), per step
    updates: Mapping[str, str]            # input name -> output name of its new value
    loss: str = "loss"
    flat: tuple[FlatView, ...] = ()       # the trainable parameters, views of the input FLAT
    gradient: str | None = None           # the value joining their gradients, one row in `flat` order


def initial_values(spec: TrainStepSpec) -> dict[str, np.ndarray]:
    """Every input of the training step but the mini-batch and the hyperparameters, at its
    initial value: parameters, optimiser state, buffers, and FLAT joined from the trainable
    parameters' initial values (so one array of each is the source of truth)."""
    values = {p.name: p.init for p in spec.params} | {s.name: s.init for s in spec.state}
    if spec.flat:
        values[FLAT] = np.concatenate([np.ravel(values[v.name]) for v in spec.flat])[None, :]
    return values


@dataclass(frozen=True)
class RunnerStep:
    """`train_step` as dlnc's runner runs it: its optimiser keeps its moments scaled by the growing
    scalar state MOMENT_SCALE (`compiler.train.FOLDED_OPTIMIZERS`), which saves a pass over the
    parameters every step. The runner brings that scale back to 1 (`folding`) before it can
    overflow and whenever values leave or enter it, so they are always the exported step's. Its
    inputs and outputs are `train_step`'s and that scale (`runner_spec`)."""
    model: onnx.ModelProto
    folding: Folding


def runner_spec(spec: TrainStepSpec) -> TrainStepSpec:
    """The spec of the runner's step: `spec` and the moments' scale, 1 at the start."""
    scale = StateSpec(MOMENT_SCALE, np.ones((), dtype=spec.state[0].init.dtype))
    return replace(spec, state=(*spec.state, scale), updates={**spec.updates, MOMENT_SCALE: f"new.{MOMENT_SCALE}"})


@dataclass(frozen=True)
class Compiled:
    program: ast.Program
    model: onnx.ModelProto
    train_step: onnx.ModelProto
    evaluation: onnx.ModelProto           # the inference graph with weights as inputs, and logits out
    spec: TrainStepSpec
    layers: tuple[LayerInfo, ...]
    loss: str
    runner_step: RunnerStep | None = None  # the step dlnc's runner runs on the CPU, where it differs


def resolve_loss(program: ast.Program) -> str:
    out = program.output
    loss = program.train.loss or DEFAULT_LOSS.get(out.kind)
    allowed = LOSSES_FOR_OUTPUT.get(out.kind, ())
    if loss not in allowed:
        raise error(f"loss {loss} does not fit output {out.name}: {out.kind}; write `loss {allowed[0]}`",
                    program.train.spans.get("loss", program.train.span), program)
    return loss


def _check_freeze(program: ast.Program) -> tuple[str, ...]:
    names = {layer.name for layer in program.layers}
    for name in program.train.freeze:
        if name not in names:
            raise error(f"freeze names '{name}', which is not a layer", program.train.spans.get("freeze"), program)
    return program.train.freeze


def _new_context(program: ast.Program, training: bool, dtype: str, vocab: int = 0,
                 steps: int | None = None, recurrent: str = "op") -> LowerContext:
    """The training step keeps dense chains feature-major; the exported models are batch-first."""
    return LowerContext(Builder(dtype), program, training, np.random.default_rng(program.train.seed),
                        vocab=vocab, steps=steps, recurrent=recurrent,
                        kept_feature_major=feature_major_layers(program.layers) if training else frozenset())


def has_recurrent(program: ast.Program) -> bool:
    """Whether the program has an rnn, gru or lstm layer (what `--recurrent` lowers)."""
    return any(isinstance(layer, ast.Recurrent) for layer in program.layers)


def _input_shape(program: ast.Program, ctx: LowerContext) -> tuple:
    """Batch-first; token ids are (N, T) with T the window in training and in a model whose recurrent
    layers are unrolled, and any length ("T") in the model otherwise."""
    if program.input.kind == "tokens":
        return ("N", ctx.steps if unrolled(ctx) and (ctx.training or has_recurrent(program)) else "T")
    return ("N", *program.input.shape)


def _input(ctx: LowerContext) -> Value:
    program = ctx.program
    check_token_input(program)
    return ctx.b.input(program.input.name, _input_shape(program, ctx),
                       dtype="int64" if program.input.kind == "tokens" else None)


def metadata(program: ast.Program, classes: tuple[str, ...], source_hash: str | None) -> dict[str, str]:
    return {"dlnc.version": __version__, "dlnc.model": program.name,
            "dlnc.source_sha256": source_hash or "", "dlnc.output_kind": program.output.kind,
            "dlnc.classes": json.dumps(list(classes)), "dlnc.input": program.input.name,
            "dlnc.output": program.output.name}


def token_metadata(program: ast.Program, vocab: tuple[str, ...], steps: int | None) -> dict[str, str]:
    """Token programs: the vocabulary (ids are positions in it), the text level and the training window."""
    source = program.data.source if program.data is not None else None
    return {"dlnc.vocab": json.dumps(list(vocab), ensure_ascii=False),
            "dlnc.text_level": (source.level or "") if source is not None and source.kind == "text" else "",
            "dlnc.sequence_length": str(steps or "")}


def recurrent_metadata(program: ast.Program, recurrent: str, steps: int | None) -> dict[str, str]:
    """A model whose recurrent layers are unrolled: the lowering and the fixed input length T
    (the token window, or the T of a `float[T, F]` input); nothing for the default, one op per layer."""
    if recurrent != "unrolled" or not has_recurrent(program):
        return {}
    length = steps if program.input.kind == "tokens" else program.input.shape[0]
    return {"dlnc.recurrent": "unrolled", "dlnc.sequence_length": str(length)}


def build_inference(program: ast.Program, normalization: Normalization | None, dtype: str = "float32",
                    vocab: int = 0, steps: int | None = None, recurrent: str = "op"):
    """The exported model: raw input in, probabilities (or values) out, weights as initializers;
    recurrent layers as one ONNX op each, or `recurrent="unrolled"` over `steps`."""
    ctx = _new_context(program, training=False, dtype=dtype, vocab=vocab, steps=steps, recurrent=recurrent)
    x = _input(ctx)
    a = lower_network(ctx, x, normalization)
    name = program.output.name
    binary = program.output.kind == "binary"
    y = ctx.b.op("squeeze", a, axes=(1,), name=name) if binary else ctx.b.op("identity", a, name=name)
    z = ctx.pre_activation[program.layers[-1].name]
    if program.output.kind == "tokens":                       # per-step logits (N·T, V) back to (N, T, V)
        logits = ctx.b.op("unfold_time", z, a, name="logits")
    else:
        logits = ctx.b.op("squeeze", z, axes=(1,), name="logits") if binary else ctx.b.op("identity", z, name="logits")
    return ctx, ctx.b.graph(program.name, [y]), ctx.b.graph(f"{program.name}_evaluation", [y, logits])


def build_train_step(program: ast.Program, normalization: Normalization | None, dtype: str = "float32",
                     vocab: int = 0, steps: int | None = None, folded: bool = False):
    """The training step graph and the spec the runtime binds it by; `folded`: the runner's form,
    whose optimiser keeps its moments scaled (`compiler.train.FOLDED_OPTIMIZERS`)."""
    loss_kind = resolve_loss(program)
    frozen = _check_freeze(program)
    ctx = _new_context(program, training=True, dtype=dtype, vocab=vocab, steps=steps)
    b = ctx.b
    b.batch = program.train.batch_size if isinstance(program.train.batch_size, int) else None
    x = _input(ctx)
    out = program.output
    y_shape = {"real": ("N", out.size), "tokens": ("N", ctx.steps)}.get(out.kind, ("N",))
    y = b.input(out.name, y_shape, dtype="int64" if out.kind in ("class", "tokens") else dtype)
    a = lower_network(ctx, x, normalization)
    if out.kind == "tokens":
        cost = sequence_loss(ctx, program.layers[-1], y)
    else:
        cost = data_loss(ctx, program.layers[-1], a, y, loss_kind)
    if program.train.regularize is not None and any(p.regularized for p in ctx.params):
        m = b.op("batch_count", x, dtype=dtype)
        cost = b.add(cost, regularization(ctx, program.train.regularize, m))
    cost = b.op("identity", cost, name="loss")

    trainable = tuple(p.name for p in ctx.params if p.layer not in frozen)
    optimizer = (FOLDED_OPTIMIZERS if folded else OPTIMIZERS)[program.train.optimizer.kind]
    # one update over every trainable parameter at once: the parameters enter twice, shaped
    # (for the forward pass) and as FLAT (for the update), and the caller binds the shaped
    # inputs as views of FLAT; the gradients are joined once. Each op of the update then
    # makes one pass over all parameters, not one per tensor.
    flat: list[FlatView] = []
    offset = 0
    for name in trainable:
        flat.append(FlatView(name, offset, tuple(int(d) for d in ctx.param_values[name].shape)))
        offset += flat[-1].size
    state = [StateSpec("step", np.zeros((), dtype=dtype))]
    shared: dict[str, Value] = {}

    def scalar_slot(name: str, init: float) -> Value:
        if name not in shared:
            shared[name] = b.input(name, ())
            state.append(StateSpec(name, np.asarray(init, dtype=dtype)))
        return shared[name]

    def tensor_slot(role: str) -> Value:
        value = b.input(f"{FLAT}.{role}", (1, offset))
        state.append(StateSpec(value.name, np.zeros((1, offset), dtype=dtype)))
        return value

    slots = Slots(tensor_slot, scalar_slot)
    scale = optimizer.gradient_scale(ctx, slots) if optimizer.gradient_scale is not None and trainable else None
    grads = grad(b, cost, [ctx.param_values[n] for n in trainable], seed=scale) if trainable else {}

    alpha = decayed_lr(ctx, program.train)
    step = b.input("step", ())
    t = b.add(step, b.scalar(1.0), name="new.step")
    updates = {"step": t}
    joined: str | None = None             # the gradients joined as one row
    if trainable:
        w = b.input(FLAT, (1, offset))
        pieces = [b.op("as_row", grads[name]) for name in trainable]
        g = b.op("concat", *pieces, axis=1, name="gradient") if len(pieces) > 1 else pieces[0]
        joined = g.name
        if program.train.clip_norm is not None:
            g = clip_by_global_norm(ctx, g, program.train.clip_norm, scale)
        new_w, new_slots = optimizer.update(ctx, w, g, alpha, t, slots)
        updates[FLAT] = new_w
        updates.update(new_slots)
    updates.update(ctx.buffer_updates)
    state.extend(ctx.buffers)

    outputs = [cost] + [b.op("identity", v, name=f"new.{k}") if k != "step" else v for k, v in updates.items()]
    graph = output_in_place(simplify(b.graph(f"{program.name}_train_step", outputs)))
    spec = TrainStepSpec(
        params=tuple(ctx.params), trainable=trainable, state=tuple(state),
        hyper=dict(ctx.hyper_defaults), x=x.name, y=y.name,
        noise=tuple((v.name, v.shape) for v in ctx.noise),
        updates={k: f"new.{k}" for k in updates}, flat=tuple(flat), gradient=joined)
    return ctx, graph, spec


def output_in_place(graph: Graph) -> Graph:
    """Drop the `identity` nodes that only rename a computed value as a graph output (`new.W`
    from W's update): the producing node takes the output's name, so it writes straight into
    the buffer bound to that output instead of a copy of it being made every step."""
    producers = graph.producers()
    inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    renames: dict[str, str] = {}
    for out in graph.outputs:
        node = producers.get(out.name)
        if node is None or node.op != "identity":
            continue
        source = node.inputs[0]
        inner = producers.get(source.name)
        if (source.name in inputs or source.name in outputs or source.name in renames or inner is None
                or inner.op == "const" or source.dtype != out.dtype or source.shape != out.shape):
            continue
        renames[source.name] = out.name
    if not renames:
        return graph

    def rename(v: Value) -> Value:
        return replace(v, name=renames[v.name]) if v.name in renames else v
    dropped = {renames[name] for name in renames}
    nodes = tuple(replace(n, inputs=tuple(rename(v) for v in n.inputs), output=rename(n.output))
                  for n in graph.nodes if not (n.op == "identity" and n.output.name in dropped))
    return replace(graph, nodes=nodes)


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX checker with full_check and strict shape inference; returns the model."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    return model


def compile_program(program: ast.Program, normalization: Normalization | None = None,
                    classes: tuple[str, ...] = (), source_hash: str | None = None,
                    opset: int = DEFAULT_OPSET, ir_version: int | None = None,
                    vocab: tuple[str, ...] = (), steps: int | None = None, recurrent: str = "op") -> Compiled:
    """Both models at `opset`; `ir_version` None is 8 or the oldest that carries `opset`.

    Token programs take the data's vocabulary (its size is `vocab`) and training window T
    (`steps`); without them, the sizes the data block declares (or placeholders, for checks).
    `recurrent` ("op" or "unrolled") lowers the recurrent layers of the exported model only: the
    evaluation graph the runtime scores with keeps one op per layer (any length)."""
    if recurrent not in RECURRENT_LOWERINGS:
        raise ValueError(f"recurrent={recurrent!r}: give one of {', '.join(RECURRENT_LOWERINGS)}")
    opset, ir_version = resolve_target(opset, ir_version)
    vocab_size, steps = token_sizes(program, len(vocab), steps)
    sizes = {"vocab": vocab_size, "steps": steps}
    infer_ctx, infer_graph, eval_graph = build_inference(program, normalization, **sizes)
    if recurrent != "op" and has_recurrent(program):
        infer_ctx, infer_graph, _ = build_inference(program, normalization, **sizes, recurrent=recurrent)
    initial = {p.name: p.init for p in infer_ctx.params} | {buf.name: buf.init for buf in infer_ctx.buffers}
    meta = metadata(program, classes, source_hash)
    if vocab_size:
        meta |= token_metadata(program, vocab or tuple(str(i) for i in range(vocab_size)), steps)
    infer_graph = simplify(infer_graph)
    model = check(to_onnx(infer_graph, initializers=initial, opset=opset, ir_version=ir_version,
                          metadata=meta | recurrent_metadata(program, recurrent, steps),
                          doc=f"dlnc inference model for {program.name}"))
    evaluation = to_onnx(simplify(eval_graph), opset=opset, ir_version=ir_version)
    train_ctx, train_graph, spec = build_train_step(program, normalization, **sizes)
    train_step = check(to_onnx(train_graph, opset=opset, ir_version=ir_version, metadata=meta,
                               doc=f"dlnc training step for {program.name}"))
    runner_step = None
    folded = FOLDED_OPTIMIZERS.get(program.train.optimizer.kind)
    if folded is not None and spec.flat:
        runner_graph = build_train_step(program, normalization, **sizes, folded=True)[1]
        runner_step = RunnerStep(to_onnx(runner_graph, opset=opset, ir_version=ir_version), folded.folding)
    return Compiled(program, model, train_step, evaluation, spec, tuple(infer_ctx.infos), resolve_loss(program),
                    runner_step)


def check_program(program: ast.Program) -> TrainStepSpec:
    """Compilation's language, shape and type checks without emission: lowers the inference graph
    and builds the differentiated training step, so every located compile error surfaces before
    any data is read. Returns the step's spec (the parameters with their initial values)."""
    vocab_size, steps = token_sizes(program, 0, None)
    build_inference(program, None, vocab=vocab_size, steps=steps)
    return build_train_step(program, None, vocab=vocab_size, steps=steps)[2]


def with_weights(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `arrays` hold those values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.asarray(arrays[tensor.name]), tensor.name))
    return out
