"""Every runnable example trains end to end, and its exported model agrees across runtimes.

The full schedules run here too (they take about a second each): the accuracies the README
quotes are asserted, not just printed.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import dsl
from runtime.cli import load_data
from conftest import EXAMPLES, with_epochs

RUNNABLE = ["cancer_logistic", "moons_shallow", "digits_deep", "digits_cnn"]
# (example, split, minimum accuracy) at the full schedule, as the README states them
TARGETS = [("cancer_logistic", "test", 0.95), ("moons_shallow", "dev", 0.95), ("digits_deep", "test", 0.96)]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_runs_on_a_short_schedule(name, tmp_path, dlnc):
    source = tmp_path / f"{name}.dln"
    source.write_text(with_epochs((EXAMPLES / f"{name}.dln").read_text(), 3))
    result = dlnc("run", source, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["epochs"] <= 3 and "train" in summary["splits"]
    for file in ("model.onnx", "train_step.onnx", "metrics.jsonl", "config.json"):
        assert (tmp_path / "run" / file).is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["epochs"] and "lr" in json.loads(lines[0])


@pytest.mark.parametrize("name,split,minimum", TARGETS)
def test_example_reaches_its_accuracy_at_full_length(name, split, minimum, tmp_path, dlnc):
    result = dlnc("run", EXAMPLES / f"{name}.dln", "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    error = json.loads(result.out)["splits"][split]["error"]
    assert 1 - error >= minimum


@pytest.mark.parametrize("name", RUNNABLE)
def test_exported_model_agrees_in_onnxruntime_and_reference(name, tmp_path, dlnc):
    source = tmp_path / f"{name}.dln"
    source.write_text(with_epochs((EXAMPLES / f"{name}.dln").read_text(), 5))
    assert dlnc("run", source, "-o", tmp_path / "run", "--quiet").code == 0
    path = tmp_path / "run" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    program = dsl.load_file(str(source))
    x = load_data(program).train.x[:50]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["dlnc.model"] == program.name and meta["dlnc.version"]
    first = program.layers[0].name
    assert {t.name for t in model.graph.initializer} >= {f"{first}.W", f"{first}.b"}
    assert first in {n.output[0] for n in model.graph.node}
