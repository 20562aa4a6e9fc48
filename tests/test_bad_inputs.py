"""The bad-input catalogue: malformed programs, data, ONNX files and file-system trouble.

Every case is tried with the real command line (in-process) and must end with exit code 2, a
message that says what is wrong, no Python traceback, and nothing written or overwritten:
the whole working folder is the same, byte for byte, before and after.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

GOOD = """model good
data { source "train.npz"; split train=0.6 dev=0.2 test=0.2 }
input x: float[3]
output y: class[2]
layers { dense 4 tanh; dense 2 softmax }
train { optimizer sgd lr=0.1; batch_size 8; epochs 2 }
"""


def good_data(folder: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(folder / "train.npz", x=rng.normal(size=(40, 3)), y=np.arange(40) % 2)


def program(folder: Path, text: str = GOOD, name: str = "m.dln") -> str:
    good_data(folder)
    (folder / name).write_text(text)
    return name


def run(folder: Path, text: str = GOOD, *extra: str) -> list[str]:
    return ["run", program(folder, text), "-o", "out", *extra]


def npz_program(folder: Path, **arrays) -> list[str]:
    argv = run(folder)
    np.savez(folder / "train.npz", **arrays)
    return argv


def csv_program(folder: Path, body: bytes) -> list[str]:
    argv = run(folder, GOOD.replace('"train.npz"', '"t.csv" label=k'))
    (folder / "t.csv").write_bytes(body)
    return argv


def trained_model(folder: Path) -> Path:
    """A small exported model, made once per case (by the compiler, not by a run)."""
    import dsl
    from compiler.program import compile_program
    model = compile_program(dsl.load(GOOD)).model
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def outside_data(folder: Path) -> list[str]:
    model = onnx.load(str(trained_model(folder)))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    (folder / "evil.onnx").write_bytes(model.SerializeToString())
    return ["info", "evil.onnx"]


def truncated_model(folder: Path) -> list[str]:
    blob = trained_model(folder).read_bytes()
    (folder / "cut.onnx").write_bytes(blob[: len(blob) // 3])
    return ["info", "cut.onnx"]


def image_folder(folder: Path, extra: Callable[[Path], None]) -> list[str]:
    from PIL import Image
    for name in ("a", "b"):
        (folder / "img" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), color=40 * i).save(folder / "img" / name / f"{i}.png")
    extra(folder / "img")
    text = (GOOD.replace('"train.npz"', '"img/"').replace("float[3]", "float[1, 8, 8]")
            .replace("layers { ", "layers { flatten; "))
    return run(folder, text)


def checkpoint_of(folder: Path, text: str, damage: Callable[[Path], None] | None = None) -> list[str]:
    """A run folder with a checkpoint made by `GOOD`, then resumed with `text`."""
    from runtime.cli import main
    (folder / "first.dln").write_text(GOOD)
    good_data(folder)
    assert main(["run", "first.dln", "-o", "out", "--quiet"]) == 0
    if damage is not None:
        damage(next((folder / "out" / "checkpoints").glob("*.npz")))
    (folder / "m.dln").write_text(text)
    return ["run", "m.dln", "-o", "out", "--resume"]


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


@dataclass(frozen=True)
class Case:
    area: str
    make: Callable[[Path], list[str]]
    says: tuple[str, ...]                 # every one of these is in the message


CASES = {
    # ------------------------------------------------------------ the language
    "misspelt activation": Case("language", lambda f: run(f, GOOD.replace("tanh", "tahn")),
                                ("m.dln:5:", "did you mean 'tanh'")),
    "unclosed block": Case("language", lambda f: run(f, GOOD.replace("dense 2 softmax }", "dense 2 softmax")),
                           ("m.dln:",)),
    "no model statement": Case("language", lambda f: run(f, GOOD.replace("model good\n", "")), ("model",)),
    "last layer disagrees with the output": Case("language", lambda f: run(f, GOOD.replace("2 softmax", "2 sigmoid")),
                                                 ("m.dln:5:", "dense 2 softmax")),
    "unknown train keyword": Case("language", lambda f: run(f, GOOD.replace("epochs 2", "epochz 2")),
                                  ("did you mean 'epochs'",)),
    "split does not add up": Case("language", lambda f: run(f, GOOD.replace("test=0.2", "test=0.3")),
                                  ("add up to",)),
    "unknown --set name": Case("language", lambda f: run(f, GOOD, "--set", "lr=0.1"), ("lr",)),
    "--set without a value": Case("language", lambda f: run(f, GOOD, "--set", "lr"), ("--set NAME=VALUE",)),
    "program is not UTF-8": Case("language", lambda f: [*run(f)[:1], _write(f, "bin.dln", b"model \xff\xfe\n"),
                                                        "-o", "out"], ("bin.dln",)),
    "empty program": Case("language", lambda f: ["run", _write(f, "empty.dln", b""), "-o", "out"], ("empty.dln",)),
    "early stopping without a dev split": Case(
        "language", lambda f: run(f, GOOD.replace("split train=0.6 dev=0.2 test=0.2", "split train=1.0")
                                  .replace("epochs 2", "epochs 2; early_stopping patience=2")),
        ("early_stopping", "dev")),
    # ------------------------------------------------------------ the data
    "missing data file": Case("data", lambda f: run(f, GOOD.replace("train.npz", "nope.npz")),
                              ("nope.npz", "does not exist")),
    "data file is a folder": Case("data", lambda f: (_mkdir(f, "dir.npz"), run(f, GOOD.replace("train.npz", "dir.npz")))[1],
                                  ("dir.npz", "folder")),
    "truncated npz": Case("data", lambda f: (run(f), _write(f, "train.npz", b"PK\x03\x04 cut"))[0],
                          ("train.npz", "not a readable .npz")),
    "pickled object arrays": Case("data", lambda f: npz_program(
        f, x=np.array([[1, "a", None]] * 10, dtype=object), y=np.arange(10) % 2), ("train.npz", "never unpickles")),
    "no y array": Case("data", lambda f: npz_program(f, x=np.ones((10, 3))), ("has no array 'y'",)),
    "NaN feature": Case("data", lambda f: npz_program(f, x=np.where(np.eye(10, 3) > 0, np.nan, 1.0),
                                                      y=np.arange(10) % 2), ("row 0", "NaN")),
    "label outside the classes": Case("data", lambda f: npz_program(f, x=np.ones((10, 3)), y=np.arange(10)),
                                      ("row 2", "outside 0..1")),
    "wrong feature width": Case("data", lambda f: npz_program(f, x=np.ones((10, 5)), y=np.arange(10) % 2),
                                ("5 features", "declares 3")),
    "no examples": Case("data", lambda f: npz_program(f, x=np.ones((0, 3)), y=np.ones(0)), ("no examples",)),
    "csv without the label column": Case("data", lambda f: csv_program(f, b"a,b,c,z\n1,2,3,0\n"), ("has no column 'k'",)),
    "csv ragged row": Case("data", lambda f: csv_program(f, b"a,b,c,k\n1,2,3,0\n1,2,1\n"), ("line 3",)),
    "csv text in a feature": Case("data", lambda f: csv_program(f, b"a,b,c,k\n1,two,3,0\n"), ("line 2", "'two'")),
    "csv not UTF-8": Case("data", lambda f: csv_program(f, b"a,b,c,k\n1,\xff,3,0\n"), ("not UTF-8",)),
    "dev_source of another width": Case("data", lambda f: (
        np.savez(f / "phone.npz", x=np.ones((8, 2)), y=np.arange(8) % 2),
        run(f, GOOD.replace('split train=0.6 dev=0.2 test=0.2', 'dev_source "phone.npz"')))[1],
        ("phone.npz", "2 features")),
    "corrupt image": Case("data", lambda f: image_folder(f, lambda d: (d / "a" / "bad.png").write_bytes(b"\x89PNG junk")),
                          ("a/bad.png", "cannot be decoded", "1 of 9 images")),
    "decompression bomb": Case("data", lambda f: image_folder(f, lambda d: _bomb(d / "b" / "bomb.png")),
                               ("b/bomb.png", "decompression bomb")),
    # ------------------------------------------------------------ ONNX files
    "truncated ONNX model": Case("onnx", truncated_model, ("cut.onnx", "not a readable ONNX model")),
    "bytes that are not ONNX": Case("onnx", lambda f: ["info", _write(f, "x.onnx", b"\x00\x01 hello \xff" * 50)],
                                    ("x.onnx",)),
    "external data outside its folder": Case("onnx", outside_data, ("evil.onnx", "outside the model's folder")),
    "model path is a folder": Case("onnx", lambda f: (_mkdir(f, "m.onnx"), ["info", "m.onnx"])[1], ("m.onnx", "folder")),
    "predict inputs of the wrong width": Case("onnx", lambda f: (
        trained_model(f), np.save(f / "x.npy", np.ones((2, 5), np.float32)), ["predict", "model.onnx", "x.npy"])[2],
        ("5 values but the model takes 3",)),
    "predict inputs missing": Case("onnx", lambda f: (trained_model(f), ["predict", "model.onnx", "none.npy"])[1],
                                   ("none.npy", "does not exist")),
    # ------------------------------------------------------------ the file system
    "missing program": Case("files", lambda f: ["run", "absent.dln", "-o", "out"], ("absent.dln",)),
    "program path is a folder": Case("files", lambda f: (_mkdir(f, "dir.dln"), ["run", "dir.dln", "-o", "out"])[1],
                                     ("dir.dln",)),
    "-o is a file": Case("files", lambda f: (_write(f, "taken", b"mine"), run(f)[:-1] + ["taken"])[1],
                         ("taken is a file",)),
    "-o below a file": Case("files", lambda f: (_write(f, "taken", b"mine"), run(f)[:-1] + ["taken/run"])[1],
                            ("taken", "is a file")),
    "unwritable output": Case("files", lambda f: run(f)[:-1] + ["/proc/dlnc-run"], ("cannot write", "/proc/dlnc-run")),
    "compile into a file": Case("files", lambda f: (_write(f, "taken", b"mine"),
                                                    ["compile", program(f), "-o", "taken"])[1], ("cannot write",)),
    "a run in the way without --force": Case("files", lambda f: _existing_run(f), ("--force",)),
    "checkpoint of another model": Case("files", lambda f: checkpoint_of(f, GOOD.replace("model good", "model bad")),
                                        ("belongs to model 'good', not 'bad'",)),
    "checkpoint that fails its checksum": Case("files", lambda f: checkpoint_of(f, GOOD, flip_a_byte),
                                               ("fails its checksum",)),
}


def _write(folder: Path, name: str, data: bytes) -> str:
    (folder / name).write_bytes(data)
    return name


def _mkdir(folder: Path, name: str) -> str:
    (folder / name).mkdir()
    return name


def _bomb(path: Path) -> None:
    from PIL import Image
    Image.new("1", (9000, 9000)).save(path)             # 81 million pixels in 10 kB


def _existing_run(folder: Path) -> list[str]:
    from runtime.cli import main
    argv = run(folder)
    assert main([*argv, "--quiet"]) == 0
    return argv


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_the_catalogue_is_big_enough():
    areas = {case.area for case in CASES.values()}
    assert len(CASES) >= 30 and areas == {"language", "data", "onnx", "files"}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_a_clear_error_and_writes_nothing(name, tmp_path, dlnc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case = CASES[name]
    argv = case.make(tmp_path)
    before = tree(tmp_path)
    result = dlnc(*argv)
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert "error:" in result.err
    for words in case.says:
        assert words in result.err, f"{words!r} not in {result.err!r}"
    assert tree(tmp_path) == before                 # nothing written, nothing overwritten
    assert not (tmp_path / "runs").exists()
