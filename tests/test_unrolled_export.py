"""`dlnc compile --recurrent unrolled`: recurrent layers exported as plain ops over a fixed T.

The default export has one ONNX RNN/GRU/LSTM op per recurrent layer, which onnx2torch cannot
convert and whose `Relu` activation onnx.reference and tract do not run (docs/interop.md). The
unrolled export reuses the training graph's cells (compiler/cells.py) over the training window T:
for every recurrent layer kind it must give the default export's outputs (ONNX Runtime) to 1e-5 on
inputs of length T, in ONNX Runtime, onnx.reference, tract and onnx2torch alike, with no
RNN/GRU/LSTM or sequence op, a static (N, T) input, and T in the metadata.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import dsl
from compiler.program import compile_program, with_weights
from model_cases import LAYER_PROGRAMS, STEPS, VOCAB, _inputs, randomized
from runtime.cli import source_hash
from test_interop import TOLERANCE, TOOLS, known_gaps, run_onnxruntime

# recurrent layer kind -> the layer program of tests/model_cases.py that has it
KINDS = {"rnn_tanh": "embed_rnn", "rnn_relu": "one_hot_rnn_relu", "gru": "embed_gru",
         "lstm": "embed_lstm_dropout", "gru_last": "gru_last_class", "lstm_then_last": "lstm_then_last_binary"}
# a float sequence input float[T, F]: its T is in its shape
FLOAT_SEQUENCE = ("model float_gru\ninput x: float[4, 3]\noutput y: class[3]\n"
                  "layers {\n  gru 5 last\n  dense 3 softmax\n}\n"
                  "train { optimizer adam lr=0.01; batch_size 8; seed 3 }\n")
RECURRENT_OPS = {"RNN", "GRU", "LSTM", "Loop", "Scan", "SequenceConstruct", "ConcatFromSequence"}


def _program(kind: str):
    if kind == "float_gru":
        return dsl.load(FLOAT_SEQUENCE, "float_gru.dln")
    name = KINDS[kind]
    return dsl.load(LAYER_PROGRAMS[name].replace("{name}", name), f"{name}.dln")


@functools.lru_cache(maxsize=None)
def exports(kind: str):
    """(default compiled, unrolled compiled, default model, unrolled model, x): both models with the
    same random weights, x a batch of length-T inputs."""
    program = _program(kind)
    tokens = program.input.kind == "tokens"
    sizes = {"source_hash": source_hash(program), "vocab": VOCAB if tokens else (),
             "steps": STEPS if tokens else None}
    default = compile_program(program, **sizes)
    unrolled = compile_program(program, **sizes, recurrent="unrolled")
    model = randomized(default)
    names = {p.name for p in default.spec.params} | {s.name for s in default.spec.state}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    return default, unrolled, model, with_weights(unrolled.model, weights), _inputs(default)


ALL_KINDS = [*KINDS, "float_gru"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unrolled_export_gives_the_default_exports_outputs_in_onnxruntime(kind):
    _, _, model, unrolled, x = exports(kind)
    want, got = run_onnxruntime(model, x), run_onnxruntime(unrolled, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize("tool", ["reference", "tract", "onnx2torch"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unrolled_export_runs_in_every_tool_with_the_default_exports_outputs(kind, tool):
    _, _, model, unrolled, x = exports(kind)
    assert known_gaps(tool, unrolled) is None
    want = run_onnxruntime(model, x)                  # the default export in ONNX Runtime (Relu included)
    got = TOOLS[tool](unrolled, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unrolled_export_is_plain_ops_over_a_static_length_recorded_in_the_metadata(kind):
    default, _, _, model, x = exports(kind)
    onnx.checker.check_model(model, full_check=True)
    assert not {n.op_type for n in model.graph.node} & RECURRENT_OPS
    assert {n.op_type for n in default.model.graph.node} & {"RNN", "GRU", "LSTM"}
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    steps = x.shape[1]
    assert dims[1] == steps and isinstance(dims[1], int)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dlnc.recurrent"] == "unrolled" and meta["dlnc.sequence_length"] == str(steps)
    assert "dlnc.recurrent" not in {p.key for p in default.model.metadata_props}


@pytest.mark.parametrize("kind", ["rnn_relu", "lstm"])
def test_unrolled_export_leaves_the_training_step_and_layers_as_they_are(kind):
    default, unrolled, _, _, _ = exports(kind)
    assert unrolled.train_step.SerializeToString() == default.train_step.SerializeToString()
    assert unrolled.evaluation.SerializeToString() == default.evaluation.SerializeToString()
    # the same layers, parameters and FLOPs; their outputs have the fixed T in place of the symbol "T"
    assert [(i.name, i.kind, i.params, i.flops) for i in unrolled.layers] == \
        [(i.name, i.kind, i.params, i.flops) for i in default.layers]
    fixed = [tuple(STEPS if d == "T" else d for d in i.output) for i in default.layers]
    assert fixed == [i.output for i in unrolled.layers]


def test_unrolled_export_of_a_program_without_recurrent_layers_is_the_default_export():
    program = dsl.load(LAYER_PROGRAMS["dense_relu"].replace("{name}", "dense_relu"), "dense_relu.dln")
    default, unrolled = compile_program(program), compile_program(program, recurrent="unrolled")
    assert unrolled.model.SerializeToString() == default.model.SerializeToString()


def test_unrolled_export_is_byte_identical_from_one_build_to_the_next():
    program = _program("gru")
    first, second = (compile_program(program, vocab=VOCAB, steps=STEPS, recurrent="unrolled") for _ in range(2))
    assert first.model.SerializeToString() == second.model.SerializeToString()


def test_an_unknown_recurrent_lowering_is_refused():
    with pytest.raises(ValueError, match="op, unrolled"):
        compile_program(_program("gru"), vocab=VOCAB, steps=STEPS, recurrent="loop")


def test_compile_recurrent_unrolled_writes_a_fixed_length_model_and_info_shows_it(tmp_path, dlnc):
    name = KINDS["rnn_relu"]
    path = tmp_path / "m.dln"
    path.write_text(LAYER_PROGRAMS[name].replace("{name}", name))     # no data: the default window
    result = dlnc("compile", path, "-o", tmp_path / "out", "--recurrent", "unrolled")
    assert result.code == 0, result.err
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    steps = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert steps > 0 and not {n.op_type for n in model.graph.node} & RECURRENT_OPS
    info = dlnc("info", tmp_path / "out" / "model.onnx").out
    assert f"recurrent layers: unrolled over {steps} steps" in info
    assert f"x: int64 [N, {steps}]" in info and "dlnc.recurrent: unrolled" in info
    ids = np.random.default_rng(0).integers(0, 7, size=(3, steps), dtype=np.int64)
    probabilities = TOOLS["reference"](model, ids)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def test_compile_refuses_an_unknown_recurrent_lowering(tmp_path, dlnc):
    name = KINDS["gru"]
    path = tmp_path / "m.dln"
    path.write_text(LAYER_PROGRAMS[name].replace("{name}", name))
    with pytest.raises(SystemExit):
        dlnc("compile", path, "-o", tmp_path / "out", "--recurrent", "loop")
