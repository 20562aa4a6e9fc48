"""The models the interop and opset tests export: every example, and one program per layer kind."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import onnx

import dsl
from compiler.emit import DEFAULT_OPSET
from compiler.program import Compiled, compile_program, initial_values, with_weights
from runtime.cli import compile_with_data, load_data, source_hash
from runtime.session import StepRunner, make_session

from conftest import EXAMPLES

EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.dln"))


def _program(input_decl: str, output_decl: str, layers: str, train: str = "optimizer adam lr=0.01") -> str:
    return (f"model {{name}}\ninput x: {input_decl}\noutput y: {output_decl}\n"
            f"layers {{\n  {layers.replace(';', chr(10) + ' ')}\n}}\ntrain {{ {train}; batch_size 8; seed 3 }}\n")


# kind -> program text; `{name}` is filled in with the kind
LAYER_PROGRAMS: dict[str, str] = {
    "dense_linear_real": _program("float[5]", "real[3]", "dense 8 linear; dense 3", "optimizer sgd lr=0.1"),
    "dense_sigmoid_binary": _program("float[6]", "binary", "dense 5 sigmoid; dense 1 sigmoid",
                                     "optimizer momentum lr=0.1 beta=0.9"),
    "dense_tanh_class": _program("float[4]", "class[3]", "dense 7 tanh; dense 3 softmax",
                                 "optimizer rmsprop lr=0.01"),
    "dense_relu": _program("float[4]", "class[3]", "dense 9 relu; dense 3 softmax"),
    "dense_leaky_relu": _program("float[4]", "class[3]", "dense 9 leaky_relu; dense 3 softmax"),
    "dense_leaky_relu_slope": _program("float[4]", "real[2]", "dense 9 leaky_relu(0.2); dense 2 relu"),
    "dense_tanh_real": _program("float[3]", "real[1]", "dense 4 tanh; dense 1 tanh"),
    "flatten": _program("float[2, 3, 4]", "class[4]", "flatten; dense 4 softmax"),
    "dropout": _program("float[6]", "class[3]", "dense 8 relu; dropout keep_prob=0.7; dense 3 softmax"),
    "batchnorm": _program("float[6]", "class[3]", "dense 8 relu; batchnorm momentum=0.8 eps=0.001; dense 3 softmax"),
    "regularized": _program("float[6]", "binary", "hidden: dense 8 relu; dense 1 sigmoid",
                            "optimizer adam lr=0.01; regularize l2 lambda=0.1; clip_norm 1.0; "
                            "lr_decay inverse rate=0.5"),
    # image layers: they join once they compile
    "conv_same": _program("float[1, 8, 8]", "class[3]", "conv 4 size=3 padding=same relu; flatten; dense 3 softmax"),
    "conv_valid_stride": _program("float[2, 9, 9]", "class[3]",
                                  "conv 3 size=3 stride=2 tanh; flatten; dense 3 softmax"),
    "conv_padding": _program("float[1, 6, 6]", "binary", "conv 2 size=3 padding=2; flatten; dense 1 sigmoid"),
    "maxpool": _program("float[1, 8, 8]", "class[3]", "conv 4 size=3 relu; maxpool size=2; flatten; dense 3 softmax"),
    "maxpool_overlapping": _program("float[2, 8, 8]", "class[3]",
                                    "conv 2 size=2 relu; maxpool size=3 stride=2; flatten; dense 3 softmax"),
    "maxpool_ragged": _program("float[1, 9, 9]", "class[3]",          # 7×7 in 2×2 windows: the last row and column left out
                               "conv 4 size=3 relu; maxpool size=2; flatten; dense 3 softmax"),
    "maxpool_on_input": _program("float[2, 7, 7]", "class[3]", "maxpool size=3 stride=2; flatten; dense 3 softmax"),
    "avgpool": _program("float[1, 8, 8]", "class[3]",
                        "conv 4 size=3 padding=1 relu; avgpool size=2; flatten; dense 3 softmax"),
    "avgpool_stride": _program("float[3, 7, 7]", "real[2]", "avgpool size=3 stride=2; flatten; dense 2"),
    # sequence layers over token inputs (VOCAB, STEPS below)
    "embed_rnn": _program("tokens", "tokens per_step", "embed 8; rnn 6; dense vocab softmax"),
    "one_hot_rnn_relu": _program("tokens", "tokens per_step", "one_hot; rnn 6 relu; dense vocab softmax"),
    "embed_gru": _program("tokens", "tokens per_step", "embed 8; gru 6; dense vocab softmax"),
    "embed_lstm_dropout": _program("tokens", "tokens per_step",
                                   "embed 8; dropout keep_prob=0.8; lstm 6; dense vocab softmax"),
    "gru_last_class": _program("tokens", "class[3]", "embed 8; gru 6 last; dense 3 softmax"),
    "lstm_then_last_binary": _program("tokens", "binary", "embed 5; lstm 4; last; dense 1 sigmoid"),
}
VOCAB = ("<EOS>", "<UNK>", "a", "b", "c", "d", "e")     # the vocabulary of the token programs
STEPS = 5                                              # their training window


@dataclass(frozen=True)
class Case:
    name: str
    compiled: Compiled
    x: np.ndarray                       # a batch of raw inputs


def vocab_size(compiled: Compiled) -> int:
    meta = {p.key: p.value for p in compiled.model.metadata_props}
    return len(json.loads(meta.get("dlnc.vocab", "[]"))) or len(VOCAB)


def _inputs(compiled: Compiled, rows: int = 7, seed: int = 0, steps: int = STEPS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if compiled.program.input.kind == "tokens":
        return rng.integers(0, vocab_size(compiled), size=(rows, steps), dtype=np.int64)
    shape = (rows, *compiled.program.input.shape)
    return rng.normal(size=shape).astype(np.float32)


def randomized(compiled: Compiled, seed: int = 1) -> onnx.ModelProto:
    """The inference model with every parameter and buffer random (the initial batchnorm
    statistics are 0 and 1, which would hide a wrong formula)."""
    rng = np.random.default_rng(seed)
    names = {p.name for p in compiled.spec.params} | {s.name for s in compiled.spec.state}
    arrays = {}
    for tensor in compiled.model.graph.initializer:
        if tensor.name in names:
            shape = tuple(tensor.dims)
            # vectors (biases, γ, β, statistics) N(0, 0.5²); weights N(0, 1/fan_in), so deep and
            # recurrent models do not saturate (ONNX's RNN weights are (1, gates·H, fan_in))
            fan_in = 1 if len(shape) < 2 else shape[-1] if len(shape) == 3 else int(np.prod(shape[1:]))
            value = rng.normal(0.0, 0.5 if len(shape) < 2 else 1.0 / np.sqrt(fan_in), size=shape)
            if tensor.name.endswith("running_var"):
                value = np.abs(value) + 0.5
            arrays[tensor.name] = value.astype(np.float32)
    return with_weights(compiled.model, arrays)


@functools.lru_cache(maxsize=None)
def example_case(name: str, opset: int = DEFAULT_OPSET) -> Case:
    """An example compiled as `dlnc compile` does (normalisation and classes from its data)."""
    path = EXAMPLES / f"{name}.dln"
    program = dsl.load_file(str(path))
    splits = load_data(program) if program.data is not None else None
    compiled = compile_with_data(program, splits, opset)
    x = splits.train.x[:7] if splits is not None else _inputs(compiled)
    x = x if compiled.program.input.kind == "tokens" else x.astype(np.float32)      # token ids stay int64
    return Case(name, compiled, x)


@functools.lru_cache(maxsize=None)
def layer_case(kind: str, opset: int = DEFAULT_OPSET) -> Case:
    text = LAYER_PROGRAMS[kind].replace("{name}", kind)
    program = dsl.load(text, f"{kind}.dln")
    tokens = program.input.kind == "tokens"
    compiled = compile_program(program, source_hash=source_hash(program), opset=opset,
                               vocab=VOCAB if tokens else (), steps=STEPS if tokens else None)
    return Case(kind, compiled, _inputs(compiled))


def case(spec: str, opset: int = DEFAULT_OPSET) -> Case:
    """`example:NAME` or `layer:KIND`."""
    family, name = spec.split(":", 1)
    return example_case(name, opset) if family == "example" else layer_case(name, opset)


ALL_CASES = [f"example:{n}" for n in EXAMPLE_NAMES] + [f"layer:{k}" for k in LAYER_PROGRAMS]


def train_feeds(compiled: Compiled, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """One mini-batch and the initial state: everything the training step takes, shaped as its
    inputs declare (N is `rows`; a sequence's T is fixed in the training graph)."""
    spec, program = compiled.spec, compiled.program
    rng = np.random.default_rng(seed)
    declared = {i.name: tuple(rows if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim)
                for i in compiled.train_step.graph.input}
    out = program.output
    if program.input.kind == "tokens":
        x = rng.integers(0, vocab_size(compiled), size=declared[spec.x], dtype=np.int64)
    else:
        x = rng.normal(size=declared[spec.x]).astype(np.float32)
    if out.kind == "tokens":
        y = rng.integers(0, vocab_size(compiled), size=declared[spec.y], dtype=np.int64)
    elif out.kind == "class":
        y = (np.arange(rows) % out.size).astype(np.int64)
    elif out.kind == "binary":
        y = (np.arange(rows) % 2).astype(np.float32)
    else:
        y = rng.normal(size=declared[spec.y]).astype(np.float32)
    feeds = {spec.x: x, spec.y: y}
    feeds |= initial_values(spec)
    feeds |= {name: np.asarray(v, np.float32) for name, v in spec.hyper.items()}
    feeds |= {name: rng.uniform(size=declared[name]).astype(np.float32) for name, _ in spec.noise}
    missing = set(declared) - set(feeds)
    assert not missing, f"train_feeds does not know the inputs {sorted(missing)}"
    return feeds


def trained(compiled: Compiled, steps: int, seed: int = 0,
            device: str = "cpu") -> tuple[StepRunner, np.ndarray, dict[str, np.ndarray]]:
    """`steps` training steps on one thread, each on a new mini-batch of `train_feeds`; the runner,
    the losses and the final arrays."""
    spec, runner = compiled.spec, StepRunner(compiled, device, 1)
    batch_inputs = (spec.x, spec.y, *(name for name, _ in spec.noise))
    losses = []
    for k in range(steps):
        feeds = train_feeds(compiled, seed=seed + k)
        losses.append(runner.step({name: feeds[name] for name in batch_inputs}))
    return runner, np.array(losses), runner.arrays()


def first_step(compiled: Compiled, device: str) -> tuple[float, np.ndarray]:
    """The compiled training step run once as it is, with its joined gradient as an extra
    output: the cost and the gradient of every trainable parameter, in FLAT's order."""
    spec, model = compiled.spec, onnx.ModelProto()
    model.CopyFrom(compiled.train_step)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(spec.gradient))
    session = make_session(model.SerializeToString(), device, 1)
    if device == "cuda":
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    feeds = train_feeds(compiled)
    loss, gradient = session.run([spec.loss, spec.gradient], {i.name: feeds[i.name] for i in session.get_inputs()})
    return float(loss), gradient.reshape(-1)


def rounding_sized(compiled: Compiled) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The elements whose first gradient is zero but for rounding (|g| ≤ 1e-5 max |g|), over
    FLAT and per trainable parameter. A ReLU unit that is active on every row of the batch and
    then batch-normalised has no effect on the cost, so its bias's gradient is such a residue;
    Adam's first step there is ±lr by the residue's sign, which each way of computing it rounds
    its own way."""
    _, gradient = first_step(compiled, "cpu")
    tiny = np.abs(gradient) <= 1e-5 * np.abs(gradient).max()
    return tiny, {v.name: v.of(tiny.reshape(1, -1)) for v in compiled.spec.flat}


def assert_trains_alike(compiled: Compiled, losses, arrays, reference_losses, reference_arrays) -> None:
    """The losses and values of `trained` from two ways of computing the same steps (two devices,
    or two forms of the step) agree to float32 rounding as Adam magnifies it: each element to
    rtol 1e-3 and atol 1e-5, but for those whose first gradient is rounding-sized
    (`rounding_sized`) and, beyond those, one element in a hundred (one at least), which may
    take a later rounding-sized gradient the other way."""
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-3, atol=1e-5)
    assert arrays.keys() == reference_arrays.keys()
    flat_tiny, tiny = rounding_sized(compiled)
    for name, expected in reference_arrays.items():
        got = arrays[name]
        assert got.shape == expected.shape and np.isfinite(got).all(), name
        free = tiny.get(name, flat_tiny.reshape(got.shape) if got.size == flat_tiny.size else False)
        close = np.isclose(got, expected, rtol=1e-3, atol=1e-5) | free
        assert (~close).sum() <= max(1, close.size // 100), f"{name}: {(~close).sum()} of {close.size} differ"
