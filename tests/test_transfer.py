"""Transfer learning: `pretrained "FILE.onnx" [until=...] [trainable]` and `freeze`, from dlnc's own
exports and from PyTorch's, with the file checked before use."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsl
from compiler.program import compile_program
from conftest import EXAMPLES
from conftest import write as write_program

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SOURCE = """model trunk_source
input x: float[1, 8, 8]
output y: class[10]
layers { conv 4 size=3 padding=same relu; maxpool size=2; conv 6 size=3 padding=same relu; avgpool size=2; flatten
         dense 10 softmax }
train { optimizer sgd lr=0.1; seed 7 }
"""



def write(tmp_path: Path, text: str, name: str = "transfer.dln") -> Path:
    return write_program(tmp_path, text, name)

def transfer(layer: str, head: str = "dense 10 softmax", train: str = "optimizer adam lr=0.01; batch_size 32; epochs 2",
             data: str = 'source "digits"; split train=0.6 dev=0.2 test=0.2') -> str:
    return (f"model transfer\ndata {{ {data} }}\ninput x: float[1, 8, 8]\noutput y: class[10]\n"
            f"layers {{\n  trunk: {layer}\n  {head}\n}}\ntrain {{ {train} }}\n")


@pytest.fixture
def dlnc_model(tmp_path) -> Path:
    """A model exported by dlnc (initial weights: any weights do)."""
    path = tmp_path / "source" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(compile_program(dsl.load(SOURCE, "source.dln")).model.SerializeToString())
    return path


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(6, 12, 3, stride=1, padding=1)
        self.fc = torch.nn.Linear(12 * 4 * 4, 10)

    def features(self, x):
        return torch.flatten(torch.relu(self.conv2(self.pool(torch.relu(self.conv1(x))))), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def export_torch(folder: Path, dynamo: bool = False) -> tuple[Path, SmallCNN]:
    torch.manual_seed(0)
    net = SmallCNN().eval()
    path = folder / ("torch_dynamo.onnx" if dynamo else "torch_cnn.onnx")
    options = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": 17,
                                               "dynamic_axes": {"image": {0: "batch"}}}
    if dynamo:
        options["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    torch.onnx.export(net, torch.randn(2, 1, 8, 8), str(path), input_names=["image"], output_names=["logits"],
                      **options)
    return path, net


def run_with_output(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    """The value of an intermediate tensor of `model` for the input x."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([tensor], {session.get_inputs()[0].name: x})[0]


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}



# ---------------------------------------------------------------- dlnc's own exports
def test_frozen_trunk_keeps_the_bytes_of_its_weights(tmp_path, dlnc, dlnc_model):
    path = write(tmp_path, transfer('pretrained "source/model.onnx" until="flatten_5"'))
    result = dlnc("run", path, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    source = onnx.load(str(dlnc_model))
    trained = onnx.load(str(tmp_path / "run" / "model.onnx"))
    step = onnx.load(str(tmp_path / "run" / "train_step.onnx"))
    original = {t.name: t for t in source.graph.initializer}
    for graph in (trained.graph, step.graph):
        copied = {t.name: t for t in graph.initializer if t.name.startswith("trunk/")}
        assert {n.removeprefix("trunk/") for n in copied} == {"conv_1.W", "conv_1.b", "conv_3.W", "conv_3.b"}
        for name, tensor in copied.items():
            before = original[name.removeprefix("trunk/")]
            assert numpy_helper.to_array(tensor).tobytes() == numpy_helper.to_array(before).tobytes()
            assert tensor.raw_data == before.raw_data
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_with_output(trained, "trunk", x), run_with_output(source, "flatten_5", x))
    assert set(arrays(trained)) - {n for n in arrays(trained) if n.startswith("trunk/")} == {"dense_2.W", "dense_2.b"}


def test_trainable_trunk_learns_and_freeze_keeps_it(tmp_path, dlnc, dlnc_model):
    source = arrays(onnx.load(str(dlnc_model)))
    path = write(tmp_path, transfer('pretrained "source/model.onnx" until="flatten_5" trainable'))
    assert dlnc("run", path, "-o", tmp_path / "tuned", "--quiet").code == 0
    tuned = arrays(onnx.load(str(tmp_path / "tuned" / "model.onnx")))
    assert {"trunk.conv_1.W", "trunk.conv_3.b"} <= set(tuned)
    assert not np.array_equal(tuned["trunk.conv_1.W"], source["conv_1.W"])
    frozen = write(tmp_path, transfer('pretrained "source/model.onnx" until="flatten_5" trainable',
                                      train="optimizer adam lr=0.01; epochs 2; freeze trunk"), "frozen.dln")
    assert dlnc("run", frozen, "-o", tmp_path / "frozen", "--quiet").code == 0
    kept = arrays(onnx.load(str(tmp_path / "frozen" / "model.onnx")))
    for name in ("conv_1.W", "conv_1.b", "conv_3.W", "conv_3.b"):
        assert kept[f"trunk.{name}"].tobytes() == source[name].tobytes()
    assert not np.array_equal(kept["dense_2.W"], tuned["dense_2.W"])
    program = dsl.load_file(str(frozen))
    assert compile_program(program).spec.trainable == ("dense_2.W", "dense_2.b")


def test_whole_model_without_until_and_shapes_table(tmp_path, dlnc, dlnc_model):
    path = write(tmp_path, transfer('pretrained "source/model.onnx"'))
    shapes = dlnc("shapes", path)
    assert shapes.code == 0 and "trunk (pretrained, frozen" in shapes.out and "(N, 10)" in shapes.out
    path = write(tmp_path, transfer('pretrained "source/model.onnx" trainable'))
    shapes = dlnc("shapes", path)
    assert shapes.code == 0 and "trunk.conv_1.W (4, 1, 3, 3)" in shapes.out


# ---------------------------------------------------------------- PyTorch's exports
@pytest.mark.parametrize("trainable", ["", "trainable"])
def test_torch_cnn_trunk_computes_what_torch_computes(tmp_path, dlnc, trainable):
    onnx_path, net = export_torch(tmp_path)
    exported = onnx.load(str(onnx_path))
    flatten = next(n.output[0] for n in exported.graph.node if n.op_type == "Flatten")
    program = dsl.load(transfer(f'pretrained "torch_cnn.onnx" until="{flatten}" {trainable}'),
                       str(tmp_path / "t.dln"))
    model = compile_program(program).model
    x = np.random.default_rng(1).normal(size=(6, 1, 8, 8)).astype(np.float32)
    want = net.features(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(run_with_output(model, "trunk", x), want, rtol=1e-5, atol=1e-5)
    path = write(tmp_path, program.source)
    result = dlnc("run", path, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["splits"]["test"]["error"] < 0.5
    if trainable:
        names = set(arrays(onnx.load(str(tmp_path / "run" / "model.onnx"))))
        assert {"trunk.conv1.weight", "trunk.conv2.bias"} <= names


def test_torch_dynamo_export_at_a_newer_opset(tmp_path, dlnc):
    pytest.importorskip("onnxscript")
    onnx_path, net = export_torch(tmp_path, dynamo=True)
    exported = onnx.load(str(onnx_path))
    assert exported.opset_import[0].version > 17
    reshape = next(n.output[0] for n in exported.graph.node if n.op_type in ("Reshape", "Flatten"))
    x = np.random.default_rng(2).normal(size=(3, 1, 8, 8)).astype(np.float32)
    want = net.features(torch.from_numpy(x)).detach().numpy()
    for trainable in ("", "trainable"):
        program = dsl.load(transfer(f'pretrained "{onnx_path.name}" until="{reshape}" {trainable}'),
                           str(tmp_path / "t.dln"))
        model = compile_program(program).model                 # frozen: converted to opset 17
        assert model.opset_import[0].version == 17
        np.testing.assert_allclose(run_with_output(model, "trunk", x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- what a trainable trunk cannot take
def handmade(folder: Path, op: str = "Cos", name: str = "the_cos") -> Path:
    """x (N, 1, 8, 8) → Conv → `op` → Flatten → features (N, 128)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(op, ["c"], ["d"], name=name),
             helper.make_node("Flatten", ["d"], ["features"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 128])],
                              initializer=[w])
    path = folder / "handmade.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_op_without_gradient_is_a_clear_error_in_a_trainable_trunk(tmp_path, dlnc):
    handmade(tmp_path)
    result = dlnc("check", write(tmp_path, transfer('pretrained "handmade.onnx" trainable')))
    assert result.code == 2
    assert "ONNX op Cos (node 'the_cos')" in result.err and "cannot be differentiated" in result.err
    assert "transfer.dln:6:" in result.err                    # at the pretrained layer
    frozen = write(tmp_path, transfer('pretrained "handmade.onnx"'), "frozen.dln")
    result = dlnc("run", frozen, "-o", tmp_path / "run", "--quiet")
    assert result.code == 0, result.err                        # frozen: any op, no gradient needed
    model = onnx.load(str(tmp_path / "run" / "model.onnx"))
    assert "Cos" in {n.op_type for n in model.graph.node}


def test_wrong_until_and_wrong_input_are_located_errors(tmp_path, dlnc, dlnc_model):
    result = dlnc("check", write(tmp_path, transfer('pretrained "source/model.onnx" until="flaten_5"')))
    assert result.code == 2 and "has no tensor of that name" in result.err and "did you mean 'flatten_5'" in result.err
    text = transfer('pretrained "source/model.onnx"').replace("float[1, 8, 8]", "float[3, 8, 8]")
    result = dlnc("check", write(tmp_path, text))
    assert result.code == 2 and "takes 'x'" in result.err and "(N, 3, 8, 8)" in result.err


# ---------------------------------------------------------------- safety
def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path, dlnc):
    (tmp_path / "notes.onnx").write_text("these are my notes, not a model\n" * 20)
    result = dlnc("check", write(tmp_path, transfer('pretrained "notes.onnx"')))
    assert result.code == 2 and "is not an ONNX model" in result.err and "Traceback" not in result.err
    missing = write(tmp_path, transfer('pretrained "missing.onnx"'))
    result = dlnc("compile", missing, "-o", tmp_path / "out")
    assert result.code == 2 and "no such ONNX file" in result.err and not (tmp_path / "out").exists()
    checked = dlnc("check", missing)                 # a trunk not trained yet: the language still checks
    assert checked.code == 0 and "missing.onnx" in checked.out


def test_the_onnx_checker_runs_before_use(tmp_path, dlnc):
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    result = dlnc("check", write(tmp_path, transfer('pretrained "bad.onnx"', head="flatten; dense 10 softmax")))
    assert result.code == 2 and "fails the ONNX checker" in result.err


def external(folder: Path, location: str) -> Path:
    """A copy of the handmade model (Relu in place of Cos) with its weights in external data at `location`."""
    path = handmade(folder, op="Relu", name="relu")
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


def test_external_data_beside_the_model_is_read(tmp_path, dlnc):
    path = external(tmp_path, "weights.bin")
    weights = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    result = dlnc("run", write(tmp_path, transfer('pretrained "handmade.onnx"')), "-o", tmp_path / "run", "--quiet")
    assert result.code == 0, result.err
    copied = arrays(onnx.load(str(tmp_path / "run" / "model.onnx")))["trunk/w"]
    assert copied.tobytes() == weights.tobytes()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "linked_folder"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, dlnc, how):
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    location = {"dotdot": "../outside/weights.bin", "absolute": str(outside / "weights.bin"),
                "symlink": "weights.bin", "linked_folder": "data/weights.bin"}[how]
    external(model_dir, location)
    shutil.move(model_dir / "weights.bin", outside / "weights.bin")      # the data now lies outside
    if how == "symlink":
        os.symlink(outside / "weights.bin", model_dir / "weights.bin")
    if how == "linked_folder":
        os.symlink(outside, model_dir / "data")
    result = dlnc("check", write(tmp_path, transfer('pretrained "model/handmade.onnx"')))
    assert result.code == 2, result.out
    assert "dlnc only reads external data stored in the model's own folder" in result.err
    assert {"dotdot": "'..'", "absolute": "absolute", "symlink": "symbolic link",
            "linked_folder": "symbolic link"}[how] in result.err


# ---------------------------------------------------------------- the example
def test_transfer_example_runs_on_short_schedules(tmp_path, dlnc):
    folder = tmp_path / "transfer"
    shutil.copytree(EXAMPLES / "transfer", folder, ignore=shutil.ignore_patterns("runs"))
    short = lambda name: (folder / name).write_text(
        (folder / name).read_text().replace("epochs 40", "epochs 2").replace("epochs 60", "epochs 2"))
    for name in ("digits_0to4.dln", "digits_5to9_frozen.dln", "digits_5to9_finetune.dln", "digits_5to9_scratch.dln"):
        short(name)
    assert dlnc("run", folder / "digits_0to4.dln", "-o", folder / "runs" / "digits_0to4", "--quiet").code == 0
    for name in ("frozen", "finetune", "scratch"):
        result = dlnc("run", folder / f"digits_5to9_{name}.dln", "-o", folder / "runs" / name, "--json")
        assert result.code == 0, result.err
        assert json.loads(result.out)["splits"]["train"]["examples"] < 120          # 10% of the 5–9 images
