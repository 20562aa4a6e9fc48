"""Exported models load and agree in every tool people use, and read well there.

For every example and every layer kind (tests/model_cases.py), the inference model gives
ONNX Runtime's outputs to 1e-5 in onnx.reference, tract and PyTorch (onnx2torch), at the
default opset and at the lowest and highest; the training step gives ONNX Runtime's loss in
onnx.reference. Where a tool lacks a standard op the test is an xfail whose reason says
which op and which `--opset` works; docs/interop.md keeps the same table.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from compiler.emit import DEFAULT_OPSET, MIN_OPSET, newest_opset
from model_cases import ALL_CASES, case, randomized, train_feeds

from conftest import EXAMPLES

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the four tools
def run_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})[0]


def run_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]


def run_tract(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    pytest.importorskip("tract")
    from tract_worker import run_in_tract
    return run_in_tract(model.SerializeToString(), x)


def import_onnx2torch():
    """onnx2torch, which imports torchvision at import time for its NMS and RoiAlign converters
    (ops dlnc never emits). Where torchvision is missing or does not load against the installed
    torch (PyPI's torchvision needs the CUDA build of torch), a stub stands in for it."""
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:                                   # ImportError, or RuntimeError from its C ops
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision is not available (a stub stands in for it)")
        ops.nms = ops.box_convert = ops.roi_align = unavailable
        stub.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    return pytest.importorskip("onnx2torch")


def run_onnx2torch(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import torch
    module = import_onnx2torch().convert(model)
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


TOOLS = {"onnxruntime": run_onnxruntime, "reference": run_reference, "tract": run_tract,
         "onnx2torch": run_onnx2torch}


def onnx2torch_gaps(model: onnx.ModelProto) -> list[str]:
    """The ops of `model` (as `Op-since_version`) that onnx2torch has no converter for."""
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    gaps = set()
    for node in model.graph.node:
        since = onnx.defs.get_schema(node.op_type, max_inclusive_version=opset).since_version
        if OperationDescription(domain="", operation_type=node.op_type, version=since) not in _CONVERTER_REGISTRY:
            gaps.add(f"{node.op_type}-{since}")
    return sorted(gaps)


def _rnn_activations(model: onnx.ModelProto) -> set[str]:
    """The activations of the model's RNN ops other than the default Tanh."""
    found = set()
    for node in model.graph.node:
        if node.op_type == "RNN":
            for attribute in node.attribute:
                if attribute.name == "activations":
                    found |= {a.decode() for a in attribute.strings} - {"Tanh"}
    return found


def known_gaps(tool: str, model: onnx.ModelProto) -> str | None:
    """Why `tool` cannot run `model`, when that is a known limitation of the tool (docs/interop.md)."""
    relu_rnn = _rnn_activations(model)
    if tool == "reference" and relu_rnn:
        return (f"onnx.reference's RNN implements only Tanh, not {', '.join(sorted(relu_rnn))} (standard ONNX); "
                f"use rnn UNITS tanh, gru or lstm for it (see docs/interop.md)")
    if tool == "tract" and relu_rnn:
        return (f"tract ignores RNN's activations attribute and computes Tanh instead of "
                f"{', '.join(sorted(relu_rnn))}: wrong outputs, no error; use rnn UNITS tanh, gru or lstm for it "
                f"(see docs/interop.md)")
    if tool == "onnx2torch":
        import_onnx2torch()
        gaps = onnx2torch_gaps(model)
        from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY
        known = {d.operation_type for d in _CONVERTER_REGISTRY}
        absent = sorted({g.split("-")[0] for g in gaps} - known)
        if absent:
            return (f"onnx2torch has no converter for {', '.join(absent)} at any opset (standard ONNX); "
                    f"no --opset helps: run these models in ONNX Runtime, onnx.reference or tract "
                    f"(see docs/interop.md)")
        if gaps:
            return (f"onnx2torch has no converter for {', '.join(gaps)} (standard ONNX); "
                    f"export with --opset {DEFAULT_OPSET} (see docs/interop.md)")
    return None


def check_agrees(tool: str, model: onnx.ModelProto, x: np.ndarray, request) -> None:
    reason = known_gaps(tool, model)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    want = run_onnxruntime(model, x)
    got = TOOLS[tool](model, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, **TOLERANCE)


# ---------------------------------------------------------------- inference models
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("spec", ALL_CASES)
def test_inference_model_agrees_across_tools(spec, tool, request):
    c = case(spec)
    check_agrees(tool, randomized(c.compiled), c.x, request)


@pytest.mark.parametrize("tool", ["reference", "tract", "onnx2torch"])
@pytest.mark.parametrize("opset", [MIN_OPSET, newest_opset()], ids=["lowest", "newest"])
@pytest.mark.parametrize("spec", ["example:digits_deep", "layer:dense_sigmoid_binary", "layer:conv_same",
                                  "layer:maxpool", "layer:avgpool", "layer:embed_gru", "layer:embed_lstm_dropout",
                                  "layer:embed_rnn"])
def test_inference_model_agrees_at_the_lowest_and_newest_opset(spec, opset, tool, request):
    c = case(spec, opset)
    check_agrees(tool, randomized(c.compiled), c.x, request)


def test_a_batch_of_one_and_a_large_batch_agree_in_the_other_tools():
    c = case("example:digits_deep")
    model = randomized(c.compiled)
    for rows in (1, 64):
        x = np.random.default_rng(rows).normal(size=(rows, 64)).astype(np.float32)
        want = run_onnxruntime(model, x)
        for tool in ("reference", "tract", "onnx2torch"):
            np.testing.assert_allclose(TOOLS[tool](model, x), want, **TOLERANCE)


# ---------------------------------------------------------------- the training step
@pytest.mark.filterwarnings("ignore:overflow encountered in exp", "ignore:invalid value encountered in divide")
@pytest.mark.parametrize("spec", ALL_CASES)
def test_training_step_gives_onnxruntimes_loss_in_the_reference_evaluator(spec):
    # (onnx.reference's Sigmoid evaluates both branches of its stable form: numpy warns, the result is right)
    compiled = case(spec).compiled
    feeds = train_feeds(compiled)
    session = ort.InferenceSession(compiled.train_step.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in compiled.train_step.graph.output]
    got = dict(zip(names, session.run(None, feeds)))
    want = dict(zip(names, ReferenceEvaluator(compiled.train_step).run(None, feeds)))
    np.testing.assert_allclose(want["loss"], got["loss"], **TOLERANCE)
    for name in names:
        # Adam's first step is lr·g/(|g| + ε): where |g| is near ε, float32 rounding of g moves it by
        # up to lr/2, so the new parameters agree to 1e-3 rather than 1e-5
        np.testing.assert_allclose(want[name], got[name], rtol=1e-3, atol=1e-3, err_msg=name)


TRACT_GAPS = {   # tract 0.21's gaps, by the training step's first node it stops at
    "conv": "tract cannot analyse the If of a one-channel filter gradient, nor translate a Conv over "
            "transposed tensors (ConvHir)",
    "single": "tract's declutter pass fails on the bias gradient (a MatMul by a vector of ones, as an EinSum) "
              "of a network whose only layer with weights is one dense layer",
}
TRACT_CASES = {"layer:dense_tanh_class": None, "layer:dense_sigmoid_binary": None, "layer:dense_tanh_real": None,
               "layer:dropout": None, "layer:batchnorm": None, "layer:regularized": None,
               "example:digits_deep": None, "example:moons_shallow": None,
               "layer:flatten": "single", "layer:conv_same": "conv", "layer:embed_gru": None}


@pytest.mark.parametrize("spec", [pytest.param(spec, marks=pytest.mark.xfail(reason=TRACT_GAPS[gap], strict=True))
                                  if gap else spec for spec, gap in TRACT_CASES.items()])
def test_dense_training_steps_run_in_tract(spec):
    """The training step, loss and every new value, in tract as in ONNX Runtime: dense steps use
    no op outside tract's set (the cross-entropy is LogSoftmax, GatherElements and a mean)."""
    pytest.importorskip("tract")
    from tract_worker import run_all_in_tract
    compiled = case(spec).compiled
    feeds = train_feeds(compiled)
    session = ort.InferenceSession(compiled.train_step.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in compiled.train_step.graph.output]
    want = dict(zip(names, session.run(None, feeds)))
    got = dict(zip(names, run_all_in_tract(compiled.train_step.SerializeToString(),
                                           [feeds[i.name] for i in compiled.train_step.graph.input])))
    np.testing.assert_allclose(got["loss"], want["loss"], **TOLERANCE)
    for name in names:      # to 1e-3, as in the reference evaluator (Adam's first step, above)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)


# ---------------------------------------------------------------- readable graphs
@pytest.mark.parametrize("spec", ALL_CASES)
def test_node_and_tensor_names_follow_the_layers(spec):
    compiled = case(spec).compiled
    program = compiled.program
    layers = {layer.name for layer in program.layers}
    model = compiled.model
    allowed = layers | {"normalize", "const", program.output.name}
    for node in model.graph.node:
        assert node.name == node.output[0] or len(node.output) > 1      # several outputs: `gru_2.op`
        for name in (node.name, *node.output):
            assert name.split(".")[0] in allowed, name
    assert len({node.name for node in model.graph.node}) == len(model.graph.node)
    outputs = {node.output[0] for node in model.graph.node}
    assert layers <= outputs | {i.name for i in model.graph.input}   # each layer's output is a tensor
    for layer in program.layers:
        for param in (p for p in compiled.spec.params if p.layer == layer.name):
            assert param.name.startswith(f"{layer.name}.")
            assert param.name in {t.name for t in model.graph.initializer}
    assert model.graph.doc_string and model.graph.name == program.name


@pytest.mark.parametrize("spec", ALL_CASES)
def test_repeated_builds_are_byte_identical(spec):
    first = case(spec).compiled
    family, name = spec.split(":", 1)
    from model_cases import example_case, layer_case
    again = (example_case if family == "example" else layer_case).__wrapped__(name)
    assert again.compiled.model.SerializeToString() == first.model.SerializeToString()
    assert again.compiled.train_step.SerializeToString() == first.train_step.SerializeToString()


def test_builds_in_separate_processes_are_byte_identical(tmp_path):
    """Set and dict order must not leak into the files: two processes, two hash seeds."""
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-m", "runtime.cli", "compile", str(EXAMPLES / "digits_deep.dln"),
                        "-o", str(out), "--svg"], check=True, env=env, cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True)
        outputs.append({f: (out / f).read_bytes() for f in ("model.onnx", "train_step.onnx", "model.svg")})
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------- the drawing
def test_compile_svg_draws_every_layer_with_the_shapes_on_the_edges(tmp_path, dlnc):
    import xml.etree.ElementTree as ET
    result = dlnc("compile", EXAMPLES / "digits_deep.dln", "-o", tmp_path, "--svg")
    assert result.code == 0, result.err
    svg = (tmp_path / "model.svg").read_text()
    root = ET.fromstring(svg)                                   # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for label in ("input x: float[64]", "normalize", "dense_1", "batchnorm_2", "dropout_3", "dense_4", "dense_5",
                  "output y: class[10]", "dense 64 relu", "W (64, 64), b (64) · 4,160 parameters"):
        assert label in texts, label
    assert texts.count("(N, 64)") == 5 and "(N, 32)" in texts and "(N, 10)" in texts
    groups = root.findall("{http://www.w3.org/2000/svg}g")
    assert sum(g.get("class", "").startswith("node") for g in groups) == 8      # input, normalize, 5 layers, output
    assert "graphviz" not in svg.lower()


def test_compile_without_svg_writes_no_drawing(tmp_path, dlnc):
    assert dlnc("compile", EXAMPLES / "moons_shallow.dln", "-o", tmp_path).code == 0
    assert not (tmp_path / "model.svg").exists()


@pytest.mark.parametrize("spec", ALL_CASES)
def test_svg_of_every_case_is_well_formed(spec):
    import xml.etree.ElementTree as ET
    from runtime.svg import layer_graph_svg
    compiled = case(spec).compiled
    svg = layer_graph_svg(compiled.program, compiled.layers)
    root = ET.fromstring(svg)
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for info in compiled.layers:
        assert info.name in texts and "(" + ", ".join(map(str, info.output)) + ")" in texts
