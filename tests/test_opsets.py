"""`--opset` and `--ir-version`: every opset from 13 to the newest the installed onnx knows.

At every opset, the inference model and the training step of every layer kind pass the ONNX
checker (full_check) and strict shape inference; the lowest and the newest opset load and run
in ONNX Runtime and give the default opset's outputs. `dlnc info` shows the opset, the IR
version, the inputs, the outputs and dlnc's metadata.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from compiler.emit import DEFAULT_IR_VERSION, DEFAULT_OPSET, MIN_OPSET, min_ir_version, newest_opset, resolve_target
from compiler.program import check
from dsl.errors import DlnError
from model_cases import ALL_CASES, LAYER_PROGRAMS, case, randomized, train_feeds

from conftest import EXAMPLES

OPSETS = list(range(MIN_OPSET, newest_opset() + 1))


@functools.cache
def newest_ort_opset() -> int:
    """The newest ai.onnx opset this onnxruntime loads (it may trail the onnx package)."""
    for opset in reversed(OPSETS):
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=min(onnx.IR_VERSION, max(min_ir_version(opset), 8)))
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    raise AssertionError("onnxruntime loads none of the opsets dlnc emits")


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ---------------------------------------------------------------- every opset
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("kind", list(LAYER_PROGRAMS))
def test_every_layer_kind_passes_the_checker_at_every_opset(kind, opset):
    compiled = case(f"layer:{kind}", opset).compiled
    for model in (compiled.model, compiled.train_step):
        assert opset_of(model) == opset and model.ir_version == max(DEFAULT_IR_VERSION, min_ir_version(opset))
        check(model)                                    # full_check and strict shape inference, again
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)


@pytest.mark.parametrize("opset", [MIN_OPSET, newest_opset()], ids=["lowest", "newest"])
@pytest.mark.parametrize("spec", [s for s in ALL_CASES if s.startswith("example:")])
def test_every_example_passes_the_checker_at_the_lowest_and_newest_opset(spec, opset):
    compiled = case(spec, opset).compiled
    for model in (compiled.model, compiled.train_step):
        assert opset_of(model) == opset
        check(model)


def test_reductions_take_their_axes_as_the_opset_says():
    """ReduceMean's axes: an attribute up to opset 17, an input from 18 (batchnorm's batch mean)."""
    for opset, as_input in ((17, False), (18, True)):
        step = case("layer:batchnorm", opset).compiled.train_step
        means = [n for n in step.graph.node if n.op_type == "ReduceMean"          # those over some axes
                 and (len(n.input) > 1 or any(a.name == "axes" for a in n.attribute))]
        assert means
        for node in means:
            assert (len(node.input) == 2) == as_input
            assert any(a.name == "axes" for a in node.attribute) == (not as_input)
        sums = [n for n in step.graph.node if n.op_type == "ReduceSum" and len(n.input) > 1]
        assert sums and all(not any(a.name == "axes" for a in n.attribute) for n in sums)


# ---------------------------------------------------------------- lowest and newest in ONNX Runtime
@pytest.mark.parametrize("opset", [MIN_OPSET, "newest"])
@pytest.mark.parametrize("spec", ALL_CASES)
def test_lowest_and_newest_opset_run_in_onnxruntime_like_the_default(spec, opset):
    opset = newest_ort_opset() if opset == "newest" else opset
    default, other = case(spec).compiled, case(spec, opset).compiled
    x = case(spec).x
    want = run(randomized(default), {"x": x})[0]
    got = run(randomized(other), {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    feeds = train_feeds(default)
    want_step, got_step = run(default.train_step, feeds), run(other.train_step, feeds)
    for a, b in zip(want_step, got_step):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_onnxruntime_runs_the_newest_opset_onnx_knows():
    """Where this fails, onnxruntime trails onnx: the test above ran at newest_ort_opset() instead;
    docs/interop.md says which opset that is."""
    assert newest_ort_opset() == newest_opset()


def test_max_pooling_gradient_before_opset_16_matches_scatter_elements():
    """Before opset 16 ScatterElements cannot add, so max pooling's gradient is placed by window
    offsets (a ConvTranspose); overlapping windows must still add up. (Windows that tile their
    input take neither path: see the next test.)"""
    for kind in ("maxpool_ragged", "maxpool_overlapping"):
        old, new = case(f"layer:{kind}", 15).compiled, case(f"layer:{kind}", 16).compiled
        assert "ScatterElements" not in {n.op_type for n in old.train_step.graph.node}
        assert "ScatterElements" in {n.op_type for n in new.train_step.graph.node}
        feeds = train_feeds(new)
        for a, b in zip(run(new.train_step, feeds), run(old.train_step, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 16, DEFAULT_OPSET])
def test_tiling_max_pooling_gradient_uses_no_indices_or_scatter(opset):
    """2×2 windows over 6×6: the gradient comes from whole-tensor ops (Resize, Equal, MaxPool),
    with no MaxPool Indices output and no ScatterElements. Its values: tests/test_ops.py (ties
    included) and the torch parity of tests/test_parity_conv.py."""
    graph = case("layer:maxpool", opset).compiled.train_step.graph
    assert "ScatterElements" not in {n.op_type for n in graph.node}
    assert all(len(n.output) == 1 for n in graph.node if n.op_type == "MaxPool")
    assert "Resize" in {n.op_type for n in graph.node}


# ---------------------------------------------------------------- the IR version
def test_the_ir_version_defaults_to_8_or_the_oldest_for_the_opset():
    assert resolve_target(13) == (13, 8) and resolve_target(17) == (17, 8)
    for opset in OPSETS:
        assert resolve_target(opset)[1] == max(8, min_ir_version(opset))
    assert resolve_target(13, 7) == (13, 7) and resolve_target(17, 10) == (17, 10)


@pytest.mark.parametrize("opset,ir_version,message", [
    (12, None, "dlnc emits ONNX opsets 13 to"),
    (newest_opset() + 1, None, "dlnc emits ONNX opsets 13 to"),
    (21, 8, "cannot carry opset 21: write --ir-version 10"),
    (17, onnx.IR_VERSION + 1, "newer than the installed onnx"),
])
def test_an_impossible_target_is_a_user_error(opset, ir_version, message):
    with pytest.raises(DlnError, match=message):
        resolve_target(opset, ir_version)


def test_compile_opset_and_ir_version_on_the_command_line(tmp_path, dlnc):
    source = EXAMPLES / "moons_shallow.dln"
    newest = newest_opset()
    for opset, ir_version in ((MIN_OPSET, None), (newest, None), (18, 9), (13, 7)):
        out = tmp_path / f"o{opset}-{ir_version}"
        args = ["compile", source, "-o", out, "--opset", str(opset)]
        args += ["--ir-version", str(ir_version)] if ir_version else []
        result = dlnc(*args)
        assert result.code == 0, result.err
        for name in ("model.onnx", "train_step.onnx"):
            model = onnx.load(str(out / name))
            assert opset_of(model) == opset
            assert model.ir_version == (ir_version or max(8, min_ir_version(opset)))
    result = dlnc("compile", source, "-o", tmp_path / "bad", "--opset", "12")
    assert result.code == 2 and "dlnc compile: error: --opset 12 is not available" in result.err
    assert not (tmp_path / "bad").exists()
    result = dlnc("compile", source, "-o", tmp_path / "bad", "--opset", "21", "--ir-version", "8")
    assert result.code == 2 and "--ir-version 10 or later" in result.err and "Traceback" not in result.err


# ---------------------------------------------------------------- metadata and dlnc info
def test_metadata_records_version_source_hash_and_classes(tmp_path, dlnc):
    import hashlib
    from compiler import __version__
    source = EXAMPLES / "digits_deep.dln"
    assert dlnc("compile", source, "-o", tmp_path).code == 0
    for name in ("model.onnx", "train_step.onnx"):
        model = onnx.load(str(tmp_path / name))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["dlnc.version"] == __version__ and model.producer_version == __version__
        assert meta["dlnc.source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert json.loads(meta["dlnc.classes"]) == [str(i) for i in range(10)]
        assert meta["dlnc.model"] == "digits_deep" and meta["dlnc.output_kind"] == "class"


def test_info_prints_inputs_outputs_opset_and_metadata(tmp_path, dlnc):
    assert dlnc("compile", EXAMPLES / "cancer_logistic.dln", "-o", tmp_path, "--opset", "18").code == 0
    result = dlnc("info", tmp_path / "model.onnx")
    assert result.code == 0, result.err
    out = result.out
    assert "ONNX IR version 8, opsets ai.onnx 18" in out and "producer: dlnc" in out
    assert "inputs:\n  x: float32 [N, 30]" in out and "outputs:\n  y: float32 [N]" in out
    assert "dlnc.model: cancer_logistic" in out and "dlnc.source_sha256: " in out and "dlnc.classes: " in out
    assert "dlnc.version: " in out and "graph: cancer_logistic" in out
    step = dlnc("info", tmp_path / "train_step.onnx").out
    assert "  lr: float32 []" in step and "  dense_1.W: float32 [1, 30]" in step and "  loss: float32 []" in step


def test_info_on_a_file_that_is_no_model_is_a_user_error(tmp_path, dlnc):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = dlnc("info", bad)
    assert result.code == 2 and "Traceback" not in result.err


def test_a_token_model_records_its_vocabulary_and_info_prints_it(tmp_path, dlnc):
    source = EXAMPLES / "names_lm.dln"
    result = dlnc("compile", source, "-o", tmp_path)
    assert result.code == 0, result.err
    model = onnx.load(str(tmp_path / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    vocab = json.loads(meta["dlnc.vocab"])
    assert len(vocab) > 2 and vocab[:2] == ["<EOS>", "<UNK>"]
    out = dlnc("info", tmp_path / "model.onnx").out
    assert "  x: int64 [N, T]" in out and f"  y: float32 [N, T, {len(vocab)}]" in out and "dlnc.vocab: [" in out
