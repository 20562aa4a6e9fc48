"""Tests of runtime/data.py: built-ins, files, bad data, splits, batches and predict inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsl import ast
from dsl.errors import DlnError, Span
from runtime.data import (Dataset, Normalization, Splits, batch_indices, load_features,
                          load_splits, normalization, split_counts, stratified_counts)

SPAN = Span(2, 10, 2, 22)


# ---------------------------------------------------------------- helpers
def data_block(path: str, kind: str | None = None, *, label: str | None = None,
               split: tuple[float, float, float] | None = None, span: Span | None = None,
               **kw) -> ast.Data:
    """A `data` block; `split` given means it was written (it gets a span)."""
    if kind is None:
        kind = "builtin" if "." not in path else Path(path).suffix[1:]
    source = ast.Source(kind, path, label=label, span=span)
    if split is not None:
        kw["split"] = ast.Split(*split, span=Span(3, 1, 3, 30))
    return ast.Data(source, **kw)


def vec(n: int) -> ast.InputDecl:
    return ast.InputDecl("x", "float", (n,))


def image(c: int, h: int, w: int) -> ast.InputDecl:
    return ast.InputDecl("x", "float", (c, h, w))


def cls(c: int, labels: tuple[str, ...] = ()) -> ast.OutputDecl:
    return ast.OutputDecl("y", "class", c, labels=labels)


BINARY = ast.OutputDecl("y", "binary", 1)


def real(k: int) -> ast.OutputDecl:
    return ast.OutputDecl("y", "real", k)


def load(data: ast.Data, input: ast.InputDecl, output: ast.OutputDecl, base: Path = Path("."),
         seed: int = 0, **kw) -> Splits:
    return load_splits(data, input, output, base, seed, **kw)


def npz(tmp_path: Path, name: str, **arrays) -> str:
    np.savez(tmp_path / name, **arrays)
    return name


def blobs(n: int = 100, d: int = 4, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), np.arange(n) % classes


def splits_of(s: Splits) -> list[Dataset]:
    return [d for d in (s.train, s.dev, s.test, s.train_dev) if d is not None]


def error(fn, *args, **kw) -> DlnError:
    with pytest.raises(DlnError) as info:
        fn(*args, **kw)
    return info.value


# ---------------------------------------------------------------- built-ins
BUILTIN_CASES = [
    ("digits", vec(64), cls(10), 1797, 10),
    ("breast_cancer", vec(30), BINARY, 569, 2),
    ("iris", vec(4), cls(3), 150, 3),
    ("wine", vec(13), cls(3), 178, 3),
    ("moons", vec(2), BINARY, 1000, 2),
    ("circles", vec(2), BINARY, 1000, 2),
]


@pytest.mark.parametrize("name,input,output,n,classes", BUILTIN_CASES)
def test_builtin_shapes_dtypes_and_labels(name, input, output, n, classes):
    s = load(data_block(name), input, output)
    assert sum(len(d) for d in splits_of(s)) == n
    assert len(s.classes) == classes
    for d in splits_of(s):
        assert d.x.dtype == np.float32 and d.x.shape[1:] == input.shape
        assert np.isfinite(d.x).all()
        if output.kind == "class":
            assert d.y.dtype == np.int64 and d.y.shape == (len(d),)
            assert d.y.min() >= 0 and d.y.max() < output.size
        else:
            assert d.y.dtype == np.float32 and set(np.unique(d.y)) <= {0.0, 1.0}
    assert len(s.source_hash) == 64


def test_builtin_class_names():
    assert load(data_block("iris"), vec(4), cls(3)).classes == ("setosa", "versicolor", "virginica")
    assert load(data_block("breast_cancer"), vec(30), BINARY).classes == ("malignant", "benign")
    assert load(data_block("digits"), vec(64), cls(10)).classes == tuple("0123456789")
    assert load(data_block("iris"), vec(4), cls(3, ("a", "b", "c"))).classes == ("a", "b", "c")


@pytest.mark.parametrize("name,input,output,n,classes", BUILTIN_CASES)
def test_builtin_deterministic_from_seed(name, input, output, n, classes):
    a, b = (load(data_block(name), input, output, seed=3) for _ in range(2))
    c = load(data_block(name), input, output, seed=4)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.source_hash == b.source_hash
    assert not np.array_equal(a.train.x, c.train.x)


def test_generated_builtins_hash_the_seed():
    moons = [load(data_block("moons"), vec(2), BINARY, seed=k).source_hash for k in (0, 0, 1)]
    assert moons[0] == moons[1] != moons[2]
    digits = [load(data_block("digits"), vec(64), cls(10), seed=k).source_hash for k in (0, 1)]
    assert digits[0] == digits[1]


@pytest.mark.parametrize("name,input,output,n,classes", BUILTIN_CASES)
def test_builtin_stratified(name, input, output, n, classes):
    fractions = (0.7, 0.15, 0.15)
    s = load(data_block(name, split=fractions), input, output, seed=1)
    everything = np.concatenate([s.train.y, s.dev.y, s.test.y])
    for c in np.unique(everything):
        total = int((everything == c).sum())
        for d, f in zip((s.train, s.dev, s.test), fractions):
            assert abs(int((d.y == c).sum()) - total * f) < 1


def test_unknown_builtin_suggests_a_name():
    e = error(load, data_block("digts", span=SPAN), vec(64), cls(10), program_path="m.dln")
    assert "digits" in e.message and e.span == SPAN and e.path == "m.dln"


def test_builtin_with_wrong_output_names_the_row():
    e = error(load, data_block("digits"), vec(64), BINARY)
    assert "'digits'" in e.message and "row" in e.message and "0 or 1" in e.message


# ---------------------------------------------------------------- image reshape
def test_flat_source_reshaped_to_image():
    s = load(data_block("digits"), image(1, 8, 8), cls(10))
    assert s.train.x.shape[1:] == (1, 8, 8)
    flat = load(data_block("digits"), vec(64), cls(10))
    np.testing.assert_array_equal(s.train.x.reshape(len(s.train), 64), flat.train.x)


def test_npz_images_without_channel(tmp_path):
    x = np.random.default_rng(0).random((20, 5, 5))
    name = npz(tmp_path, "img.npz", x=x, y=np.arange(20) % 2)
    s = load(data_block(name), image(1, 5, 5), BINARY, tmp_path)
    assert s.train.x.shape[1:] == (1, 5, 5)


def test_image_width_mismatch(tmp_path):
    name = npz(tmp_path, "img.npz", x=np.zeros((10, 50)), y=np.zeros(10))
    e = error(load, data_block(name), image(1, 8, 8), BINARY, tmp_path)
    assert "img.npz" in e.message and "50" in e.message and "64" in e.message


# ---------------------------------------------------------------- npz and csv happy paths
def test_npz_happy_path(tmp_path):
    x, y = blobs(100, 4, 3)
    name = npz(tmp_path, "train.npz", x=x, y=y)
    s = load(data_block(name, split=(0.6, 0.2, 0.2)), vec(4), cls(3), tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (60, 20, 20)
    assert s.train_dev is None and s.classes == ("0", "1", "2")
    import hashlib
    assert s.source_hash == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    # every example lands in exactly one split, unchanged
    rows = {tuple(np.float32(r)) for r in x}
    seen = [tuple(r) for d in splits_of(s) for r in d.x]
    assert len(seen) == len(set(seen)) == 100 and set(seen) == rows


def test_npz_real_targets(tmp_path):
    x = np.random.default_rng(0).random((30, 3))
    name = npz(tmp_path, "r.npz", x=x, y=x @ np.ones((3, 2)))
    s = load(data_block(name), vec(3), real(2), tmp_path)
    assert s.train.y.shape == (24, 2) and s.train.y.dtype == np.float32 and s.classes == ()
    one = npz(tmp_path, "r1.npz", x=x, y=x.sum(axis=1))
    assert load(data_block(one), vec(3), real(1), tmp_path).train.y.shape == (24, 1)


def test_npz_string_labels(tmp_path):
    x, _ = blobs(30, 2)
    name = npz(tmp_path, "s.npz", x=x, y=np.array(["dog", "cat", "cow"] * 10))
    s = load(data_block(name), vec(2), cls(3), tmp_path)
    assert s.classes == ("cat", "cow", "dog")


def test_relative_path_resolves_from_base_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    x, y = blobs(20, 2, 2)
    npz(tmp_path / "sub", "d.npz", x=x, y=y)
    assert len(load(data_block("sub/d.npz"), vec(2), BINARY, tmp_path).train) == 16


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


IRIS_CSV = "sepal,petal,species\n" + "".join(
    f"{i % 7}.5,{i % 5}.25,{['setosa', 'versicolor', 'virginica'][i % 3]}\n" for i in range(30))


def test_csv_string_labels(tmp_path):
    name = write(tmp_path, "iris.csv", IRIS_CSV)
    s = load(data_block(name, label="species"), vec(2), cls(3), tmp_path)
    assert s.classes == ("setosa", "versicolor", "virginica")
    assert sum(len(d) for d in splits_of(s)) == 30
    assert s.train.x.dtype == np.float32 and s.train.y.dtype == np.int64


def test_csv_labels_follow_declared_class_names(tmp_path):
    name = write(tmp_path, "iris.csv", IRIS_CSV)
    order = ("virginica", "setosa", "versicolor")
    s = load(data_block(name, label="species"), vec(2), cls(3, order), tmp_path)
    assert s.classes == order
    first = "".join(IRIS_CSV.splitlines(keepends=True)[:2])
    assert first.endswith("setosa\n")


def test_csv_label_column_anywhere_and_numeric(tmp_path):
    text = "y,a,b\n" + "".join(f"{i % 2},{i},{i * 2}\n" for i in range(10))
    s = load(data_block(write(tmp_path, "t.csv", text), label="y"), vec(2), BINARY, tmp_path)
    for d in splits_of(s):
        np.testing.assert_array_equal(d.x[:, 1], 2 * d.x[:, 0])
        np.testing.assert_array_equal(d.y, d.x[:, 0] % 2)


def test_csv_default_label_is_last_column(tmp_path):
    text = "a,b,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(10))
    s = load(data_block(write(tmp_path, "t.csv", text)), vec(2), BINARY, tmp_path)
    assert s.train.x.shape == (8, 2)


def test_csv_binary_names(tmp_path):
    text = "a,ok\n" + "".join(f"{i},{'yes' if i % 2 else 'no'}\n" for i in range(10))
    s = load(data_block(write(tmp_path, "t.csv", text), label="ok"), vec(1), BINARY, tmp_path)
    assert s.classes == ("no", "yes")
    for d in splits_of(s):
        np.testing.assert_array_equal(d.y, d.x[:, 0] % 2)


def test_csv_several_real_targets(tmp_path):
    text = "a,t1,b,t2\n" + "".join(f"{i},{i + 1},{2 * i},{i - 1}\n" for i in range(10))
    s = load(data_block(write(tmp_path, "t.csv", text), label="t1,t2"), vec(2), real(2), tmp_path)
    for d in splits_of(s):
        np.testing.assert_array_equal(d.y, np.stack([d.x[:, 0] + 1, d.x[:, 0] - 1], axis=1))


def test_csv_real_target_not_a_number(tmp_path):
    name = write(tmp_path, "t.csv", "a,t\n1,2.5\n2,big\n")
    e = error(load, data_block(name, label="t"), vec(1), real(1), tmp_path)
    assert "t.csv" in e.message and "line 3" in e.message and "big" in e.message


def test_named_labels_agree_across_files(tmp_path):
    write(tmp_path, "a.csv", "f,k\n" + "".join(f"{i},{'bcd'[i % 3]}\n" for i in range(30)))
    write(tmp_path, "d.csv", "f,k\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(10)))
    data = data_block("a.csv", label="k", dev_source=ast.Source("csv", "d.csv", label="k"))
    s = load(data, vec(1), cls(4), tmp_path)
    assert s.classes == ("a", "b", "c", "d")
    for d in splits_of(s):                  # a.csv holds b, c, d; d.csv holds a, b
        assert set(np.unique(d.y)) <= {0, 1, 2, 3}
    assert {1, 2, 3} <= set(np.unique(s.train.y)) and 0 in s.dev.y


def test_csv_unknown_label_column(tmp_path):
    name = write(tmp_path, "iris.csv", IRIS_CSV)
    e = error(load, data_block(name, label="specis"), vec(2), cls(3), tmp_path)
    assert "iris.csv" in e.message and "species" in e.message


# ---------------------------------------------------------------- bad data
def bad(tmp_path, x, y, input=None, output=None, name="bad.npz"):
    npz(tmp_path, name, x=x, y=y)
    return error(load, data_block(name), input or vec(x.shape[1]), output or cls(3), tmp_path)


def test_nan_in_features_names_first_row(tmp_path):
    x, y = blobs(20, 3)
    x[7, 1] = np.nan
    x[12, 0] = np.inf
    e = bad(tmp_path, x, y)
    assert "bad.npz" in e.message and "row 7" in e.message and "NaN" in e.message
    assert e.path == str(tmp_path / "bad.npz")


def test_values_overflowing_float32_are_caught(tmp_path):
    x, y = blobs(10, 2)
    x[4, 0] = 1e300
    assert "row 4" in bad(tmp_path, x, y).message


def test_class_label_out_of_range(tmp_path):
    x, y = blobs(20, 3)
    y[5] = 3
    e = bad(tmp_path, x, y)
    assert "row 5" in e.message and "0..2" in e.message and "class[4]" in e.message
    y[5] = -1
    assert "row 5" in bad(tmp_path, x, y).message


def test_class_label_not_integer(tmp_path):
    x, _ = blobs(20, 3)
    y = (np.arange(20) % 3).astype(float)
    y[9] = 1.5
    e = bad(tmp_path, x, y)
    assert "row 9" in e.message and "1.5" in e.message and "whole number" in e.message


def test_binary_label_not_zero_or_one(tmp_path):
    x, _ = blobs(20, 3)
    y = np.arange(20) % 2
    y[11] = 2
    e = bad(tmp_path, x, y, output=BINARY)
    assert "row 11" in e.message and "0 or 1" in e.message


def test_lengths_differ(tmp_path):
    x, y = blobs(20, 3)
    e = bad(tmp_path, x, y[:19])
    assert "bad.npz" in e.message and "20" in e.message and "19" in e.message


def test_truncated_npz(tmp_path):
    x, y = blobs(200, 3)
    npz(tmp_path, "full.npz", x=x, y=y)
    blob = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    e = error(load, data_block("cut.npz"), vec(3), cls(3), tmp_path)
    assert "cut.npz" in e.message and "np.savez" in e.message


def test_not_an_npz(tmp_path):
    (tmp_path / "text.npz").write_text("hello, this is not a zip file\n")
    e = error(load, data_block("text.npz"), vec(3), cls(3), tmp_path)
    assert "text.npz" in e.message and ".npz" in e.message
    np.save(tmp_path / "plain.npy", np.zeros((3, 3)))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    e = error(load, data_block("plain.npz"), vec(3), cls(3), tmp_path)
    assert "plain.npz" in e.message and ".npy" in e.message


def test_object_arrays_are_refused(tmp_path):
    x, _ = blobs(3, 2)
    y = np.array([1, "a", None], dtype=object)
    np.savez(tmp_path / "obj.npz", x=x, y=y)
    e = error(load, data_block("obj.npz"), vec(2), cls(3), tmp_path)
    assert "obj.npz" in e.message and "'y'" in e.message and "objects" in e.message


@pytest.mark.parametrize("missing", ["x", "y"])
def test_missing_array(tmp_path, missing):
    x, y = blobs(10, 2)
    arrays = {"x": x, "y": y}
    arrays["features" if missing == "x" else "labels"] = arrays.pop(missing)
    e = error(load, data_block(npz(tmp_path, "m.npz", **arrays)), vec(2), cls(3), tmp_path)
    assert "m.npz" in e.message and f"'{missing}'" in e.message


def test_input_width_mismatch_names_both(tmp_path):
    x, y = blobs(20, 5)
    npz(tmp_path, "w.npz", x=x, y=y)
    e = error(load, data_block("w.npz"), vec(4), cls(3), tmp_path)
    assert "w.npz" in e.message and "5 features" in e.message and "float[4]" in e.message


def test_real_width_mismatch(tmp_path):
    x, _ = blobs(20, 2)
    npz(tmp_path, "r.npz", x=x, y=np.zeros((20, 3)))
    e = error(load, data_block("r.npz"), vec(2), real(2), tmp_path)
    assert "r.npz" in e.message and "width 3" in e.message and "real[2]" in e.message


def test_missing_file(tmp_path):
    e = error(load, data_block("nowhere.npz"), vec(2), cls(3), tmp_path)
    assert "nowhere.npz" in e.message and "does not exist" in e.message
    assert e.path == str(tmp_path / "nowhere.npz") and e.span is None


def test_error_points_into_the_program_when_source_has_a_span(tmp_path):
    e = error(load, data_block("nowhere.npz", span=SPAN), vec(2), cls(3), tmp_path,
              program_path="model.dln")
    assert e.span == SPAN and e.path == "model.dln" and "nowhere.npz" in e.message
    rendered = e.located(None, "model m\ndata { source \"nowhere.npz\" }\n").render()
    assert rendered.startswith("model.dln:2:10: error: data file 'nowhere.npz'")


def test_csv_ragged_row(tmp_path):
    name = write(tmp_path, "r.csv", "a,b,y\n1,2,0\n3,4\n5,6,1\n")
    e = error(load, data_block(name, label="y"), vec(2), BINARY, tmp_path)
    assert "r.csv" in e.message and "line 3" in e.message and "2 cells" in e.message


def test_csv_non_numeric_feature(tmp_path):
    name = write(tmp_path, "n.csv", "a,b,y\n1,2,0\n3,4,1\n5,six,1\n")
    e = error(load, data_block(name, label="y"), vec(2), BINARY, tmp_path)
    assert "n.csv" in e.message and "line 4" in e.message and "'b'" in e.message
    assert "six" in e.message


def test_csv_nan_names_the_line(tmp_path):
    name = write(tmp_path, "n.csv", "a,b,y\n1,2,0\n\n3,nan,1\n")
    e = error(load, data_block(name, label="y"), vec(2), BINARY, tmp_path)
    assert "n.csv" in e.message and "line 4" in e.message and "NaN" in e.message


def test_csv_without_header(tmp_path):
    name = write(tmp_path, "h.csv", "1,2,0\n3,4,1\n")
    e = error(load, data_block(name), vec(2), BINARY, tmp_path)
    assert "h.csv" in e.message and "header" in e.message


def test_csv_label_out_of_range_names_the_line(tmp_path):
    name = write(tmp_path, "l.csv", "a,y\n1,0\n2,1\n3,5\n")
    e = error(load, data_block(name, label="y"), vec(1), cls(3), tmp_path)
    assert "l.csv" in e.message and "line 4" in e.message


def test_too_many_named_classes(tmp_path):
    name = write(tmp_path, "iris.csv", IRIS_CSV)
    e = error(load, data_block(name, label="species"), vec(2), cls(2), tmp_path)
    assert "3 classes" in e.message and "class[3]" in e.message


def test_misspelt_builtin_read_as_a_folder_says_the_folder_is_missing():
    data = ast.Data(ast.Source("images", "irs", span=SPAN))
    e = error(load, data, image(1, 8, 8), cls(3))
    assert "does not exist" in e.message and e.span == SPAN


def test_token_outputs_need_a_tokens_input():
    out = ast.OutputDecl("y", "tokens", 0, per_step=True, span=SPAN)
    e = error(load, data_block("iris"), vec(4), out)
    assert "input x: tokens" in e.message and e.span == SPAN


def test_split_fractions_must_add_to_one():
    e = error(load, data_block("iris", split=(0.5, 0.2, 0.2)), vec(4), cls(3))
    assert "add up to 1" in e.message


# ---------------------------------------------------------------- splits
def test_split_counts_within_one_of_ideal():
    for n in range(0, 60):
        for fractions in [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (1 / 3, 1 / 3, 1 / 3), (0.5, 0.5)]:
            counts = split_counts(n, fractions)
            assert sum(counts) == n
            assert all(abs(c - n * f) < 1 for c, f in zip(counts, fractions))


def test_stratified_counts_controlled_rounding():
    rng = np.random.default_rng(0)
    for trial in range(300):
        sizes = rng.integers(0, 40, size=rng.integers(1, 12))
        fractions = [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.95, 0.05)][trial % 3]
        table = stratified_counts(sizes, fractions)
        np.testing.assert_array_equal(table.sum(axis=1), sizes)
        assert list(table.sum(axis=0)) == split_counts(int(sizes.sum()), fractions)
        assert (np.abs(table - np.outer(sizes, fractions)) <= 1).all()


def test_split_sizes_exact_with_many_classes(tmp_path):
    x, y = blobs(100, 2, 3)                               # classes of 34, 33, 33
    s = load(data_block(npz(tmp_path, "d.npz", x=x, y=y), split=(0.6, 0.2, 0.2)), vec(2), cls(3),
             tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (60, 20, 20)


def test_empty_splits_are_none():
    s = load(data_block("moons", split=(0.8, 0.2, 0.0)), vec(2), BINARY)
    assert s.test is None and s.train_dev is None and len(s.dev) == 200


def test_train_dev_carved_from_train():
    whole = load(data_block("digits"), vec(64), cls(10))
    s = load(data_block("digits", train_dev=0.1), vec(64), cls(10))
    assert len(s.train) + len(s.train_dev) == len(whole.train)
    np.testing.assert_array_equal(s.dev.x, whole.dev.x)
    # the same class mix as train: each class within 1 of its share
    for c in range(10):
        total = int((whole.train.y == c).sum())
        assert abs(int((s.train_dev.y == c).sum()) - 0.1 * total) < 1


def test_dev_source_split_50_50(tmp_path):
    """As the notes do it: half of the other distribution is mixed into train, the other half
    is cut 50/50 into dev and test; train_dev is carved from the mixed train."""
    x, y = blobs(100, 3, 2)
    xd, yd = blobs(40, 3, 2, seed=1)
    npz(tmp_path, "web.npz", x=x, y=y)
    npz(tmp_path, "phone.npz", x=xd + 100, y=yd)
    data = data_block("web.npz", dev_source=ast.Source("npz", "phone.npz"), train_dev=0.05)
    s = load(data, vec(3), BINARY, tmp_path)
    assert len(s.train) + len(s.train_dev) == 120 and len(s.train_dev) == 6
    assert len(s.dev) == len(s.test) == 10
    assert (s.dev.x > 50).all() and (s.test.x > 50).all()
    phone_in_train = int((s.train.x[:, 0] > 50).sum()) + int((s.train_dev.x[:, 0] > 50).sum())
    assert phone_in_train == 20
    assert s.dev_distribution == "other" and s.test_distribution == "other"
    for d in (s.dev, s.test):
        assert int(d.y.sum()) == 5                        # stratified: 5 of each class
    web = (tmp_path / "web.npz").read_bytes()
    import hashlib
    assert s.source_hash != hashlib.sha256(web).hexdigest()


def test_dev_source_with_written_split(tmp_path):
    x, y = blobs(100, 3, 2)
    npz(tmp_path, "web.npz", x=x, y=y)
    npz(tmp_path, "phone.npz", x=x[:40] + 100, y=y[:40])
    data = data_block("web.npz", split=(0.8, 0.1, 0.1), dev_source=ast.Source("npz", "phone.npz"))
    s = load(data, vec(3), BINARY, tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (100, 20, 20)
    assert (s.dev.x > 50).sum() == 10 * 3 and (s.train.x > 50).sum() == 20 * 3


def test_test_source(tmp_path):
    x, y = blobs(100, 3, 2)
    npz(tmp_path, "a.npz", x=x, y=y)
    npz(tmp_path, "b.npz", x=x[:30] + 100, y=y[:30])
    s = load(data_block("a.npz", test_source=ast.Source("npz", "b.npz")), vec(3), BINARY, tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (90, 10, 30)
    assert (s.test.x > 50).all()
    assert s.dev_distribution == "same" and s.test_distribution == "other"
    npz(tmp_path, "c.npz", x=x[:10] - 100, y=y[:10])
    both = data_block("a.npz", dev_source=ast.Source("npz", "c.npz"),
                      test_source=ast.Source("npz", "b.npz"))
    s = load(both, vec(3), BINARY, tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (105, 5, 30)
    assert (s.dev.x < -50).all() and int((s.train.x[:, 0] < -50).sum()) == 5


def test_dev_source_errors_name_that_file(tmp_path):
    x, y = blobs(20, 3, 2)
    npz(tmp_path, "a.npz", x=x, y=y)
    npz(tmp_path, "d.npz", x=x[:, :2], y=y)
    e = error(load, data_block("a.npz", dev_source=ast.Source("npz", "d.npz")), vec(3), BINARY,
              tmp_path)
    assert "d.npz" in e.message and "2 features" in e.message


def test_real_outputs_split_without_stratification(tmp_path):
    x = np.random.default_rng(0).random((50, 2))
    npz(tmp_path, "r.npz", x=x, y=x.sum(axis=1))
    s = load(data_block("r.npz", split=(0.5, 0.3, 0.2)), vec(2), real(1), tmp_path)
    assert (len(s.train), len(s.dev), len(s.test)) == (25, 15, 10)
    for d in splits_of(s):
        np.testing.assert_allclose(d.y[:, 0], d.x.sum(axis=1), rtol=1e-6)


# ---------------------------------------------------------------- normalization
def test_normalization():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 4)).astype(np.float32)
    x[:, 2] = 7.0                                         # a constant feature
    norm = normalization(x)
    assert isinstance(norm, Normalization)
    assert norm.mean.dtype == norm.std.dtype == np.float32 and norm.mean.shape == (4,)
    assert norm.std[2] == 1.0
    z = (x - norm.mean) / norm.std
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0)[[0, 1, 3]], 1, atol=1e-4)


def test_normalization_of_images():
    s = load(data_block("digits"), image(1, 8, 8), cls(10))
    norm = normalization(s.train.x)
    assert norm.mean.shape == norm.std.shape == (1, 1, 1)           # per channel, as torchvision
    np.testing.assert_allclose(norm.mean[0, 0, 0], s.train.x.mean(), rtol=1e-5)
    np.testing.assert_allclose(norm.std[0, 0, 0], s.train.x.std(), rtol=1e-5)
    z = (s.train.x - norm.mean) / norm.std
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    assert np.abs(z).max() < 10          # no pixel blown up by a near-zero per-pixel σ


# ---------------------------------------------------------------- batches
@pytest.mark.parametrize("n,size,sizes", [(10, 3, [3, 3, 3, 1]), (10, "full", [10]),
                                           (10, 10, [10]), (5, 1, [1] * 5), (4, 64, [4])])
def test_batch_indices_cover_each_index_once(n, size, sizes):
    batches = batch_indices(n, size, np.random.default_rng(0))
    assert [len(b) for b in batches] == sizes
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


def test_batch_indices_reshuffle_and_reproduce():
    rng = np.random.default_rng(5)
    first, second = (np.concatenate(batch_indices(100, 16, rng)) for _ in range(2))
    assert not np.array_equal(first, second)
    again = np.random.default_rng(5)
    np.testing.assert_array_equal(np.concatenate(batch_indices(100, 16, again)), first)
    np.testing.assert_array_equal(np.concatenate(batch_indices(100, 16, again)), second)


@pytest.mark.parametrize("size", [0, -1, "half", 2.5, True])
def test_batch_indices_bad_size(size):
    with pytest.raises(DlnError):
        batch_indices(10, size, np.random.default_rng(0))


# ---------------------------------------------------------------- load_features
def test_load_features_npy(tmp_path):
    np.save(tmp_path / "in.npy", np.arange(12, dtype=np.float64).reshape(3, 4))
    x = load_features(tmp_path / "in.npy")
    assert x.dtype == np.float32 and x.shape == (3, 4)
    np.save(tmp_path / "one.npy", np.arange(4))
    assert load_features(tmp_path / "one.npy").shape == (1, 4)


def test_load_features_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "n.csv").write_text("1,2\n3,4\n")
    for name in ("h.csv", "n.csv"):
        np.testing.assert_array_equal(load_features(tmp_path / name), [[1, 2], [3, 4]])


def test_load_features_bad_inputs(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n3\n")
    e = error(load_features, tmp_path / "r.csv")
    assert "r.csv" in e.message and "line 3" in e.message
    (tmp_path / "t.csv").write_text("1,2\n3,x\n")
    e = error(load_features, tmp_path / "t.csv")
    assert "t.csv" in e.message and "line 2" in e.message and "'x'" in e.message
    (tmp_path / "nan.csv").write_text("1,2\n3,4\nnan,1\n")
    assert "line 3" in error(load_features, tmp_path / "nan.csv").message
    x = np.ones((4, 2))
    x[2, 1] = np.inf
    np.save(tmp_path / "inf.npy", x)
    e = error(load_features, tmp_path / "inf.npy")
    assert "inf.npy" in e.message and "row 2" in e.message
    np.save(tmp_path / "obj.npy", np.array([1, None], dtype=object), allow_pickle=True)
    assert "objects" in error(load_features, tmp_path / "obj.npy").message
    e = error(load_features, tmp_path / "missing.npy")
    assert "missing.npy" in e.message and "does not exist" in e.message
    (tmp_path / "x.txt").write_text("1 2\n")
    assert ".csv" in error(load_features, tmp_path / "x.txt").message
