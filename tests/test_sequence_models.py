"""Sequence models in the compiler: parity with PyTorch, the unrolled graph against the exported ONNX
recurrent ops, float64 gradients of whole training graphs, and the checks on sequence programs.

PyTorch's gate blocks are r, z, n (GRU) and i, f, g, o (LSTM); ONNX's, which dlnc stores, are
z, r, h and i, o, f, c. `PERMUTATION[cell][k]` is the PyTorch block that ONNX block k holds.
Both GRUs apply the reset gate after the recurrent product (ONNX linear_before_reset = 1).

Run with `-s` to see the largest differences from PyTorch.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import dsl
from compiler.autodiff import grad
from compiler.emit import to_onnx
from compiler.ir import Builder
from compiler.lower import LowerContext, lower_network
from compiler.lower_sequence import sequence_loss
from compiler.program import compile_program, with_weights
from compiler.simplify import simplify
from compiler.train import data_loss
from dsl.errors import DlnError

PERMUTATION = {"rnn": [0], "gru": [1, 0, 2], "lstm": [0, 3, 1, 2]}
TORCH_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
N, T, V, D, H = 4, 7, 11, 6, 8
OBSERVED: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def report_observed():
    yield
    print("\nlargest absolute differences vs torch (float32):")
    for name, value in sorted(OBSERVED.items()):
        print(f"  {name:28s} {value:.2e}")


def program(layers: str, output: str = "tokens per_step", input_decl: str = "tokens") -> dsl.ast.Program:
    text = (f"model seq\ninput x: {input_decl}\noutput y: {output}\nlayers {{ {layers} }}\n"
            f"train {{ optimizer sgd lr=0.1; batch_size 4; seed 5 }}\n")
    return dsl.load(text, "seq.dln")


def torch_blocks(onnx_weight: np.ndarray, cell: str) -> np.ndarray:
    """ONNX gate order → PyTorch gate order (rows of (G·H, ...) or a (G·H,) bias)."""
    blocks = np.split(onnx_weight, len(PERMUTATION[cell]))
    out = [None] * len(blocks)
    for k, source in enumerate(PERMUTATION[cell]):
        out[source] = blocks[k]
    return np.concatenate(out)


def onnx_blocks(torch_weight: np.ndarray, cell: str) -> np.ndarray:
    blocks = np.split(torch_weight, len(PERMUTATION[cell]))
    return np.concatenate([blocks[source] for source in PERMUTATION[cell]])


# ---------------------------------------------------------------- the unrolled training forward and its gradients
def training_graph(prog, dtype: str = "float32", steps: int = T, vocab: int = V):
    """Forward outputs (every named layer), the loss, and the gradient of every parameter, as ONNX."""
    ctx = LowerContext(Builder(dtype), prog, True, np.random.default_rng(prog.train.seed), vocab=vocab, steps=steps)
    b = ctx.b
    x = b.input("x", ("N", steps), dtype="int64")
    out = prog.output
    per_step = out.kind == "tokens"
    y = b.input("y", ("N", steps) if per_step else ("N",), dtype="int64" if out.kind != "binary" else dtype)
    a = lower_network(ctx, x, None)
    last = prog.layers[-1]
    loss = sequence_loss(ctx, last, y) if per_step else data_loss(ctx, last, a, y, "cross_entropy"
                                                                  if out.kind == "class" else "binary_cross_entropy")
    loss = b.op("identity", loss, name="loss")
    params = [ctx.param_values[p.name] for p in ctx.params]
    grads = grad(b, loss, params)
    named = {n.output.name: n.output for n in b.nodes}
    layer_outputs = [named[layer.name] for layer in prog.layers if layer.name in named]
    outputs = [loss, *layer_outputs] + [b.op("identity", grads[p.name], name=f"grad.{p.name}") for p in params]
    model = to_onnx(simplify(b.graph("check", outputs)), opset=17)
    return model, ctx.params


def random_params(params, seed: int = 0, scale: float = 0.5, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p.name: (rng.normal(0.0, scale, size=p.init.shape)).astype(dtype) for p in params}


def batch(seed: int = 1, steps: int = T, classes: int | None = None):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(N, steps))
    y = rng.integers(0, V, size=(N, steps)) if classes is None else rng.integers(0, classes, size=(N,))
    return x.astype(np.int64), y.astype(np.int64)


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


# ---------------------------------------------------------------- PyTorch
class TorchSequenceModel(nn.Module):
    """embed → recurrent layers → (last) → linear, with dlnc's parameters copied in."""

    def __init__(self, cells: list[tuple[str, str, int, str]], out_features: int, last: bool):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        layers, features = [], D
        for name, cell, units, activation in cells:
            kwargs = {"nonlinearity": activation} if cell == "rnn" else {}
            layers.append(TORCH_CELLS[cell](features, units, batch_first=True, **kwargs))
            features = units
        self.recurrent = nn.ModuleList(layers)
        self.cells = cells
        self.linear = nn.Linear(features, out_features)
        self.last = last

    def load(self, params: dict[str, np.ndarray], embed: str, dense: str) -> None:
        with torch.no_grad():
            self.embed.weight.copy_(torch.from_numpy(params[f"{embed}.E"]))
            for (name, cell, units, _), layer in zip(self.cells, self.recurrent):
                gh = params[f"{name}.W"].shape[1]
                layer.weight_ih_l0.copy_(torch.from_numpy(torch_blocks(params[f"{name}.W"][0], cell)))
                layer.weight_hh_l0.copy_(torch.from_numpy(torch_blocks(params[f"{name}.R"][0], cell)))
                layer.bias_ih_l0.copy_(torch.from_numpy(torch_blocks(params[f"{name}.B"][0, :gh], cell)))
                layer.bias_hh_l0.copy_(torch.from_numpy(torch_blocks(params[f"{name}.B"][0, gh:], cell)))
            self.linear.weight.copy_(torch.from_numpy(params[f"{dense}.W"]))
            self.linear.bias.copy_(torch.from_numpy(params[f"{dense}.b"]))

    def forward(self, x):
        outputs = []
        a = self.embed(x)
        for layer in self.recurrent:
            a, _ = layer(a)
            outputs.append(a)
        if self.last:
            a = a[:, -1]
        return self.linear(a), outputs

    def grads(self, embed: str, dense: str) -> dict[str, np.ndarray]:
        out = {f"{embed}.E": self.embed.weight.grad.numpy(), f"{dense}.W": self.linear.weight.grad.numpy(),
               f"{dense}.b": self.linear.bias.grad.numpy()}
        for (name, cell, _, _), layer in zip(self.cells, self.recurrent):
            out[f"{name}.W"] = onnx_blocks(layer.weight_ih_l0.grad.numpy(), cell)[None]
            out[f"{name}.R"] = onnx_blocks(layer.weight_hh_l0.grad.numpy(), cell)[None]
            out[f"{name}.B"] = np.concatenate([onnx_blocks(layer.bias_ih_l0.grad.numpy(), cell),
                                               onnx_blocks(layer.bias_hh_l0.grad.numpy(), cell)])[None]
        return out


# name, dlnc layers, [(layer name, cell, units, activation)], output declaration
PER_STEP_CASES = [
    ("rnn_tanh", "embed 6; rnn 8; dense vocab softmax", [("rnn_2", "rnn", 8, "tanh")]),
    ("rnn_relu", "embed 6; rnn 8 relu; dense vocab softmax", [("rnn_2", "rnn", 8, "relu")]),
    ("gru", "embed 6; gru 8; dense vocab softmax", [("gru_2", "gru", 8, "tanh")]),
    ("lstm", "embed 6; lstm 8; dense vocab softmax", [("lstm_2", "lstm", 8, "tanh")]),
    ("lstm_gru_stacked", "embed 6; lstm 8; gru 5; dense vocab softmax",
     [("lstm_2", "lstm", 8, "tanh"), ("gru_3", "gru", 5, "tanh")]),
]


def _compare(label: str, ours: np.ndarray, theirs: np.ndarray, tolerance: float = 1e-5) -> None:
    difference = float(np.max(np.abs(ours - theirs)))
    OBSERVED[label] = max(OBSERVED[label], difference)
    assert difference <= tolerance, f"{label}: max |dlnc − torch| = {difference:.3e}"


@pytest.mark.parametrize("name,layers,cells", PER_STEP_CASES, ids=[c[0] for c in PER_STEP_CASES])
def test_per_step_forward_and_gradients_match_torch(name, layers, cells):
    prog = program(layers)
    model, params = training_graph(prog)
    weights = random_params(params)
    x, y = batch()
    got = run_ort(model, {"x": x, "y": y, **weights})
    dense = prog.layers[-1].name
    reference = TorchSequenceModel(cells, V, last=False)
    reference.load(weights, "embed_1", dense)
    logits, hidden = reference(torch.from_numpy(x))
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y).reshape(-1), reduction="sum") / N
    loss.backward()
    _compare(f"{name} loss", got["loss"], loss.detach().numpy())
    for (layer, cell, _, _), h in zip(cells, hidden):
        _compare(f"{name} {cell} outputs", got[layer], h.detach().numpy())
    _compare(f"{name} probabilities", got[dense], torch.softmax(logits, -1).detach().numpy())
    for pname, g in reference.grads("embed_1", dense).items():
        _compare(f"{name} gradients", got[f"grad.{pname}"], g)


@pytest.mark.parametrize("layers,output", [("embed 6; gru 8 last; dense 3 softmax", "class[3]"),
                                           ("embed 6; lstm 8; last; dense 3 softmax", "class[3]")])
def test_many_to_one_matches_torch(layers, output):
    prog = program(layers, output)
    model, params = training_graph(prog)
    weights = random_params(params, seed=2)
    x, y = batch(classes=3)
    got = run_ort(model, {"x": x, "y": y, **weights})
    cell = "gru" if "gru" in layers else "lstm"
    cells = [(f"{cell}_2", cell, 8, "tanh")]
    dense = prog.layers[-1].name
    reference = TorchSequenceModel(cells, 3, last=True)
    reference.load(weights, "embed_1", dense)
    logits, _ = reference(torch.from_numpy(x))
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    _compare(f"{cell} last loss", got["loss"], loss.detach().numpy())
    _compare(f"{cell} last probabilities", got[dense], torch.softmax(logits, -1).detach().numpy())
    for pname, g in reference.grads("embed_1", dense).items():
        _compare(f"{cell} last gradients", got[f"grad.{pname}"], g)


# ---------------------------------------------------------------- the exported model: any length, same numbers
@pytest.mark.parametrize("name,layers,cells", PER_STEP_CASES, ids=[c[0] for c in PER_STEP_CASES])
def test_exported_model_equals_the_unrolled_graph_and_takes_any_length(name, layers, cells):
    prog = program(layers)
    vocab = tuple(f"t{i}" for i in range(V))
    compiled = compile_program(prog, vocab=vocab, steps=T)
    training, params = training_graph(prog)
    weights = random_params(params, seed=3)
    exported = with_weights(compiled.model, weights)
    onnx.checker.check_model(exported, full_check=True)
    recurrent_ops = {n.op_type for n in exported.graph.node} & {"RNN", "GRU", "LSTM"}
    assert recurrent_ops == {c[1].upper() for c in cells}
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = batch(seed=4)
    unrolled = run_ort(training, {"x": x, "y": y, **weights})[prog.layers[-1].name]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], unrolled, atol=1e-5, rtol=0)
    reference = TorchSequenceModel(cells, V, last=False)
    reference.load(weights, "embed_1", prog.layers[-1].name)
    for steps in (1, 3, 20):
        xs = np.random.default_rng(steps).integers(0, V, size=(2, steps)).astype(np.int64)
        logits, _ = reference(torch.from_numpy(xs))
        _compare(f"{name} exported, T={steps}", session.run(None, {"x": xs})[0],
                 torch.softmax(logits, -1).detach().numpy())
    meta = {p.key: p.value for p in exported.metadata_props}
    assert meta["dlnc.vocab"] == '["' + '", "'.join(vocab) + '"]' and meta["dlnc.sequence_length"] == str(T)


def test_exported_many_to_one_takes_any_length():
    prog = program("embed 6; gru 8 last; dense 2 softmax", "class[2]")
    compiled = compile_program(prog, vocab=tuple(map(str, range(V))), steps=T)
    session = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for steps in (1, T, 30):
        p = session.run(None, {"x": np.zeros((3, steps), np.int64)})[0]
        assert p.shape == (3, 2) and np.allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_onnx_reference_runs_the_exported_recurrent_ops():
    prog = program("embed 6; lstm 8; gru 5; dense vocab softmax")
    compiled = compile_program(prog, vocab=tuple(map(str, range(V))), steps=T)
    model = with_weights(compiled.model, random_params(compiled.spec.params, seed=6))
    x = np.random.default_rng(0).integers(0, V, size=(2, 9)).astype(np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, {"x": x})[0], atol=1e-5)


# ---------------------------------------------------------------- float64 gradients of whole training graphs
@pytest.mark.parametrize("layers,output", [
    ("embed 3; gru 4; dense vocab softmax", "tokens per_step"),
    ("embed 3; lstm 4; rnn 3 relu; dense vocab softmax", "tokens per_step"),
    ("one_hot; rnn 4; dense 5 tanh; dense vocab softmax", "tokens per_step"),
    ("embed 3; lstm 4 last; dense 1 sigmoid", "binary"),
    ("embed 3; gru 4; last; dense 3 softmax", "class[3]"),
])
def test_training_graph_gradients_match_central_differences(layers, output):
    prog = program(layers, output)
    steps, vocab = 5, 6
    model, params = training_graph(prog, "float64", steps=steps, vocab=vocab)
    rng = np.random.default_rng(0)
    weights = random_params(params, scale=0.7, dtype=np.float64)
    x = rng.integers(0, vocab, size=(3, steps)).astype(np.int64)
    y = {"tokens": rng.integers(0, vocab, size=(3, steps)), "class": rng.integers(0, 3, size=3),
         "binary": rng.integers(0, 2, size=3).astype(np.float64)}[prog.output.kind]
    run = ReferenceEvaluator(model)
    outputs = dict(zip([o.name for o in model.graph.output], run.run(None, {"x": x, "y": y, **weights})))
    v = {n: rng.normal(size=w.shape) for n, w in weights.items()}
    h = 1e-6
    plus = run.run(["loss"], {"x": x, "y": y, **{n: w + h * v[n] for n, w in weights.items()}})[0]
    minus = run.run(["loss"], {"x": x, "y": y, **{n: w - h * v[n] for n, w in weights.items()}})[0]
    analytic = sum(float(np.sum(outputs[f"grad.{n}"] * v[n])) for n in weights)
    assert analytic == pytest.approx(float(plus - minus) / (2 * h), rel=1e-6, abs=1e-8)


def test_the_gradient_of_a_sliced_sequence_is_one_stack_not_a_sum_of_pads():
    prog = program("embed 8; gru 16; dense vocab softmax")
    compiled = compile_program(prog, vocab=tuple(map(str, range(V))), steps=32)
    ops = [n.op_type for n in compiled.train_step.graph.node]
    assert ops.count("Pad") <= 2                 # only the bias of step 0 (h₋₁ = 0), a (3H,) vector
    stacks = [n for n in compiled.train_step.graph.node if n.op_type == "Concat" and len(n.input) == 32]
    assert len(stacks) == 2                      # the hidden states forward, dXp backward
    assert "ConcatFromSequence" not in ops and "SequenceConstruct" not in ops
    assert "GRU" not in ops and "GRU" in {n.op_type for n in compiled.model.graph.node}


def test_a_gru_language_model_of_the_benchmark_size_compiles():
    text = ("model bench\ndata { source \"t.txt\" text level=char; sequence_length 32 }\ninput x: tokens\n"
            "output y: tokens per_step\nlayers { embed 32; gru 128; dense vocab softmax }\n"
            "train { optimizer adam lr=0.001; batch_size 32 }\n")
    compiled = compile_program(dsl.load(text, "bench.dln"), vocab=tuple(map(str, range(64))), steps=32)
    shapes = {p.name: p.init.shape for p in compiled.spec.params}
    assert shapes == {"embed_1.E": (64, 32), "gru_2.W": (1, 384, 32), "gru_2.R": (1, 384, 128),
                      "gru_2.B": (1, 768), "dense_3.W": (64, 128), "dense_3.b": (64,)}


# ---------------------------------------------------------------- sequence programs that do not fit
@pytest.mark.parametrize("layers,output,message", [
    ("gru 8; dense vocab softmax", "tokens per_step", "the first layer must turn them into vectors"),
    ("dense 4; dense vocab softmax", "tokens per_step", "the first layer must turn them into vectors"),
    ("embed 4; gru 8; dense 3 softmax", "class[3]", "keep its last step"),
    ("embed 4; gru 8 last; dense vocab softmax", "tokens per_step", "drop the `last`"),
    ("embed 4; gru 8; dense 5 softmax", "tokens per_step", "dense vocab softmax"),
    ("embed 4; last; last; dense 3 softmax", "class[3]", "takes a sequence"),
    ("embed 4; embed 4; gru 3 last; dense 3 softmax", "class[3]", "takes the token ids"),
])
def test_misfitting_sequence_programs_are_located_errors(layers, output, message):
    with pytest.raises(DlnError) as info:
        compile_program(program(layers, output), vocab=tuple(map(str, range(V))), steps=T)
    assert message in info.value.message and info.value.span is not None


def test_embed_on_a_float_input_and_vocab_without_tokens_are_errors():
    with pytest.raises(DlnError, match="takes the token ids"):
        compile_program(program("embed 4; gru 3 last; dense 2 softmax", "class[2]", "float[5, 3]"))
    with pytest.raises(DlnError, match="`vocab` is the vocabulary size"):
        compile_program(program("gru 3 last; dense vocab relu; dense 4 softmax", "class[4]", "float[5, 3]"))


def test_float_sequences_feed_recurrent_layers():
    compiled = compile_program(program("lstm 6 last; dense 2 softmax", "class[2]", "float[5, 3]"))
    session = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((4, 5, 3), np.float32)})[0].shape == (4, 2)
