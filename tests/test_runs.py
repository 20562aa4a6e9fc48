"""`dlnc run` end to end: the run folder, the error analysis and its three situations, data
from two distributions, image folders, and non-finite values."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, write
from runtime import checkpoint
from runtime.analysis import analyse, analysis_text

TINY = """model tiny
param width = 8
data { source "iris"; split train=0.6 dev=0.2 test=0.2; train_dev 0.1; normalize; human_error 0.02 }
input x: float[4]
output y: class[3]
layers { hidden: dense width tanh; dense 3 softmax }
train { optimizer adam lr=0.05; batch_size 16; epochs 6; seed 3 }
"""



# ---------------------------------------------------------------- the run folder
def test_the_run_folder_holds_every_file(tmp_path, dlnc):
    program = write(tmp_path, TINY)
    result = dlnc("run", program, "-o", tmp_path / "run", "--set", "width=5")
    assert result.code == 0, result.err
    out = tmp_path / "run"
    for name in ("model.onnx", "train_step.onnx", "metrics.jsonl", "report.txt", "report.json", "curves.png",
                 "config.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.rglob("*.tmp"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 7))
    for split in ("train", "train_dev", "dev", "test"):
        assert f"{split}_loss" in lines[0] and f"{split}_error" in lines[0]
    assert lines[0]["lr"] == pytest.approx(0.05) and "cost" in lines[0]

    config = json.loads((out / "config.json").read_text())
    assert config["source_sha256"] == hashlib.sha256(program.read_bytes()).hexdigest()
    assert config["params"]["width"] == 5 and config["train"]["epochs"] == 6
    assert config["train"]["optimizer"]["lr"] == 0.05 and config["loss"] == "cross_entropy"
    assert config["graph_inputs"]["lr"] == pytest.approx(0.05) and len(config["data_sha256"]) == 64
    assert "span" not in json.dumps(config)

    report = json.loads((out / "report.json").read_text())
    assert report["epochs"] == 6 and set(report["splits"]) == {"train", "train_dev", "dev", "test"}
    assert report["analysis"]["errors"]["human"] == 0.02
    text = (out / "report.txt").read_text()
    assert "error analysis" in text and "avoidable bias" in text and "largest gap" in text
    assert text.strip() in result.out.strip() or "error analysis" in result.out

    from PIL import Image
    with Image.open(out / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1000, 400)


def test_quiet_and_json_modes(tmp_path, dlnc):
    program = write(tmp_path, TINY)
    quiet = dlnc("run", program, "-o", tmp_path / "a", "--quiet")
    assert quiet.code == 0 and quiet.out == "" and quiet.err == ""
    result = dlnc("run", program, "-o", tmp_path / "b", "--json")
    assert result.code == 0 and result.err == ""
    summary = json.loads(result.out)
    assert summary["analysis"]["largest"] in ("avoidable_bias", "variance", "data_mismatch", "overfitting_to_dev",
                                              None)
    assert summary == json.loads((tmp_path / "b" / "report.json").read_text())


def test_the_default_run_folder_is_named_after_the_model_and_time(tmp_path, dlnc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = write(tmp_path, TINY)
    assert dlnc("run", program, "--quiet").code == 0
    assert dlnc("run", program, "--quiet").code == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"tiny-\d{8}-\d{6}(-\d+)?", f) for f in folders)
    assert all((tmp_path / "runs" / f / "model.onnx").is_file() for f in folders)


def test_overwriting_a_run_needs_force(tmp_path, dlnc):
    program = write(tmp_path, TINY)
    assert dlnc("run", program, "-o", tmp_path / "run", "--quiet").code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = dlnc("run", program, "-o", tmp_path / "run", "--quiet")
    assert again.code == 2 and "--force" in again.err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert dlnc("run", program, "-o", tmp_path / "run", "--quiet", "--force").code == 0


# ---------------------------------------------------------------- the error analysis
def test_analysis_gaps_with_a_train_dev_split():
    a = analyse({"train": 0.05, "train_dev": 0.07, "dev": 0.20, "test": 0.21}, 0.01)
    gaps = {g.name: round(g.value, 6) for g in a.gaps}
    assert gaps == {"avoidable_bias": 0.04, "variance": 0.02, "data_mismatch": 0.13, "overfitting_to_dev": 0.01}
    assert a.largest.name == "data_mismatch" and "more like the dev" in a.remedies[0]
    text = analysis_text(a)
    assert "train-dev − train" in text and "dev − train-dev" in text and "← largest" in text


def test_analysis_without_train_dev_uses_dev_minus_train():
    a = analyse({"train": 0.0, "dev": 0.12, "test": 0.30}, None, dev_distribution="other")
    assert [g.name for g in a.gaps] == ["avoidable_bias", "variance", "overfitting_to_dev"]
    assert a.largest.name == "overfitting_to_dev" and "bigger dev set" in a.remedies[0]
    assert any("train_dev" in n for n in a.notes) and any("taken as 0" in n for n in a.notes)
    nothing = analyse({"train": 0.0, "dev": 0.0}, 0.0)
    assert nothing.largest is None and "no gap is positive" in analysis_text(nothing)


def test_analysis_of_a_regression_speaks_mse():
    a = analyse({"train": 0.5, "dev": 0.6}, 0.1, real=True)
    assert a.unit == "MSE" and a.largest.name == "avoidable_bias" and "mean squared error" in analysis_text(a)


UNDERFIT = """model underfit
data { source "circles"; split train=0.6 dev=0.2 test=0.2; train_dev 0.1; human_error 0.02 }
input x: float[2]
output y: binary
layers { dense 1 sigmoid }
train { optimizer adam lr=0.05; batch_size 64; epochs 20; seed 0 }
"""

OVERFIT = """model overfit
data { source "digits"; split train=0.08 dev=0.46 test=0.46; human_error 0.01; normalize }
input x: float[64]
output y: class[10]
layers { dense 256 relu; dense 10 softmax }
train { optimizer adam lr=0.01; batch_size full; epochs 150; seed 0 }
"""

SITUATIONS = {
    # a straight line cannot separate two circles: train error far above human error
    "underfit network": (UNDERFIT, "avoidable_bias"),
    # 144 training digits, 256 hidden units, no regularisation: train error 0, dev error well above
    "overfit on little data": (OVERFIT, "variance"),
    # web digits for training, blurred, shifted, noisy "phone" digits for dev and test
    "shifted dev distribution": ((EXAMPLES / "cats_mismatch.dln").read_text(), "data_mismatch"),
}


@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_the_diagnosis_names_the_gap_of_each_situation(situation, tmp_path, dlnc):
    text, expected = SITUATIONS[situation]
    folder = EXAMPLES if "cats_mismatch" in text else tmp_path
    path = folder / "cats_mismatch.dln" if folder is EXAMPLES else write(tmp_path, text)
    result = dlnc("run", path, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    analysis = json.loads(result.out)["analysis"]
    gaps = {name: round(g["value"], 4) for name, g in analysis["gaps"].items()}
    print(f"\n{situation}: errors {analysis['errors']} gaps {gaps} largest {analysis['largest']}")
    assert analysis["largest"] == expected
    second = sorted(gaps.values())[-2]
    assert gaps[expected] >= second + 0.04          # clearly the largest, not by a hair
    report = (tmp_path / "run" / "report.txt").read_text()
    assert f"largest gap: {expected.replace('_', ' ')}" in report


# ---------------------------------------------------------------- two distributions
def test_the_mismatch_example_splits_as_the_notes_describe(tmp_path):
    import dsl
    from runtime.cli import load_data
    program = dsl.load_file(str(EXAMPLES / "cats_mismatch.dln"))
    splits = load_data(program)
    with np.load(EXAMPLES / "web_images.npz") as web, np.load(EXAMPLES / "phone_images.npz") as phone:
        web_rows = {row.tobytes() for row in web["x"].astype(np.float32)}
        phone_rows = {row.tobytes() for row in phone["x"].astype(np.float32)}
        n_web, n_phone = len(web["x"]), len(phone["x"])

    def count(ds, rows):
        return sum(row.tobytes() in rows for row in ds.x)
    assert count(splits.dev, phone_rows) == len(splits.dev) == n_phone // 4
    assert count(splits.test, phone_rows) == len(splits.test) == n_phone // 4
    mixed = count(splits.train, phone_rows) + count(splits.train_dev, phone_rows)
    assert mixed == n_phone // 2                     # half of the phone data is mixed into training
    assert count(splits.train, web_rows) + count(splits.train_dev, web_rows) == n_web
    assert len(splits.train_dev) == round(0.05 * (n_web + n_phone // 2))
    assert 0 < count(splits.train_dev, phone_rows) < len(splits.train_dev)   # train-dev is train's mix


def test_the_mismatch_data_script_is_deterministic():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_mismatch", EXAMPLES / "make_mismatch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    web, phone = module.make()
    with np.load(EXAMPLES / "web_images.npz") as stored:
        assert np.array_equal(stored["x"], web["x"]) and np.array_equal(stored["y"], web["y"])
    with np.load(EXAMPLES / "phone_images.npz") as stored:
        assert np.array_equal(stored["x"], phone["x"]) and np.array_equal(stored["y"], phone["y"])


# ---------------------------------------------------------------- image folders
IMAGES = """model pictures
data { source "pictures/"; split train=0.6 dev=0.2 test=0.2; normalize }
input x: float[CHANNELS, 8, 8]
output y: binary
layers { flatten; dense 16 relu; dense 1 sigmoid }
train { optimizer adam lr=0.01; batch_size 32; epochs 15; seed 0 }
"""


def image_folder(root: Path, count: int = 240, size: int = 16) -> Path:
    """Digits as PNG (even rows) and JPEG (odd rows), upscaled to size × size, in small/ and big/."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder = root / "pictures"
    for name in ("small", "big"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST)
        label = "big" if digits.target[i] >= 5 else "small"
        if i % 2:
            image.save(folder / label / f"{i:04d}.jpg", quality=95)
        else:
            image.save(folder / label / f"{i:04d}.png")
    (folder / "small" / "notes.txt").write_text("not an image, skipped")
    return folder


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_folder_trains(tmp_path, dlnc, channels):
    image_folder(tmp_path)
    result = dlnc("run", write(tmp_path, IMAGES.replace("CHANNELS", str(channels))), "-o", tmp_path / "run",
                  "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["splits"]["train"]["examples"] == 144
    assert summary["splits"]["test"]["error"] < 0.25
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert len(meta["data_sha256"]) == 64


def test_image_values_are_resized_and_scaled(tmp_path):
    import dsl
    from runtime.cli import load_data
    image_folder(tmp_path, count=20)
    program = dsl.load(IMAGES.replace("CHANNELS", "3"), path=str(tmp_path / "m.dln"))
    splits = load_data(program)
    x = np.concatenate([splits.train.x, splits.dev.x, splits.test.x])
    assert x.shape == (20, 3, 8, 8) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert np.allclose(x[:, 0], x[:, 1]) and splits.classes == ("big", "small")


def test_corrupt_images_are_listed_and_nothing_runs(tmp_path, dlnc):
    from PIL import Image
    folder = image_folder(tmp_path, count=40)
    good = next((folder / "big").glob("*.png")).read_bytes()
    (folder / "big" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "small" / "noise.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, format="GIF")
    (folder / "small" / "animated.png").write_bytes(gif.getvalue())
    result = dlnc("run", write(tmp_path, IMAGES.replace("CHANNELS", "1")), "-o", tmp_path / "run")
    assert result.code == 2 and "Traceback" not in result.err
    assert "3 of 43 images cannot be used" in result.err
    for name in ("big/truncated.png", "small/noise.jpg", "small/animated.png"):
        assert name in result.err, name
    assert not (tmp_path / "run").exists()


def test_decompression_bombs_are_refused(tmp_path, dlnc):
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    folder = image_folder(tmp_path, count=40)
    Image.new("1", (9000, 9000)).save(folder / "big" / "bomb.png")          # 81 million pixels, 10 kB
    Image.new("1", (7000, 7000)).save(folder / "small" / "nearly.png")      # 49 million: above the limit too
    result = dlnc("run", write(tmp_path, IMAGES.replace("CHANNELS", "1")), "-o", tmp_path / "run")
    assert result.code == 2 and "Traceback" not in result.err
    assert "big/bomb.png" in result.err and "small/nearly.png" in result.err
    assert "decompression bomb" in result.err and "81,000,000 pixels" in result.err
    assert not (tmp_path / "run").exists()
    assert Image.MAX_IMAGE_PIXELS == limit                  # Pillow's global limit is restored


@pytest.mark.parametrize("make,message", [
    (lambda f: None, "has no sub-folders"),
    (lambda f: (f / "cat").mkdir(), "hold no PNG or JPEG images"),
    (lambda f: (f / "stray.png").write_bytes(b"x"), "outside the class sub-folders"),
])
def test_badly_laid_out_image_folders(tmp_path, dlnc, make, message):
    folder = tmp_path / "pictures"
    folder.mkdir()
    make(folder)
    if message == "outside the class sub-folders":
        (folder / "a").mkdir()
    result = dlnc("run", write(tmp_path, IMAGES.replace("CHANNELS", "1")), "-o", tmp_path / "run")
    assert result.code == 2 and message in result.err and "m.dln:2:" in result.err
    assert not (tmp_path / "run").exists()


def test_an_image_folder_needs_an_image_input(tmp_path, dlnc):
    image_folder(tmp_path, count=10)
    text = IMAGES.replace("float[CHANNELS, 8, 8]", "float[64]")
    result = dlnc("run", write(tmp_path, text), "-o", tmp_path / "run")
    assert result.code == 2 and "float[C, H, W]" in result.err


# ---------------------------------------------------------------- non-finite values
DIVERGING = """model diverge
data { source "reg.npz"; split train=0.8 dev=0.2 }
input x: float[4]
output y: real[1]
layers { dense 1 linear }
train { optimizer sgd lr=LR; batch_size 16; epochs 60; seed 0 }
"""


def diverging(tmp_path: Path, lr: str) -> Path:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 4)) * 3).astype(np.float32)
    np.savez(tmp_path / "reg.npz", x=x, y=x.sum(axis=1, keepdims=True))
    return write(tmp_path, DIVERGING.replace("LR", lr))


def test_a_non_finite_cost_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, dlnc):
    # lr above 2/λmax of this least-squares problem: SGD diverges after a few epochs
    program = diverging(tmp_path, "0.15")
    result = dlnc("run", program, "-o", tmp_path / "run", "--checkpoint-interval", "0")
    assert result.code == 2 and "Traceback" not in result.err
    found = re.search(r"the cost became (nan|inf) at epoch (\d+), step (\d+) \(batch (\d+) of (\d+)", result.err)
    assert found, result.err
    epoch, step = int(found.group(2)), int(found.group(3))
    assert epoch > 1 and step > 10
    kept = checkpoint.latest(tmp_path / "run" / checkpoint.FOLDER)
    assert kept.epoch == epoch - 1 and f"epoch {epoch - 1}) is kept" in result.err
    assert all(np.isfinite(a).all() for a in kept.arrays.values())
    assert not (tmp_path / "run" / "model.onnx").exists()


def test_check_numerics_catches_the_update_that_overflows(tmp_path, dlnc):
    # an absurd learning rate: the first update overflows float32 while its cost is still finite
    program = diverging(tmp_path, "3e37")
    plain = dlnc("run", program, "-o", tmp_path / "a")
    checked = dlnc("run", program, "-o", tmp_path / "b", "--check-numerics")
    assert plain.code == checked.code == 2
    assert "the cost became" in plain.err and "step 2 " in plain.err
    assert "the new value of 'dense_1.W' is Inf" in checked.err and "step 1 " in checked.err
    assert "no checkpoint had been written yet" in checked.err
