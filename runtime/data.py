"""Examples for training: load a `data` block's sources, check them, and split them.

`load_splits` turns the AST's `Data`, `InputDecl` and `OutputDecl` into `Splits`: arrays ready
for the training loop (features float32 shaped `(n, *input.shape)`; labels int64 `(n,)` for
`class[C]`, float32 `(n,)` of 0/1 for `binary`, float32 `(n, K)` for `real[K]`).

Sources
- built-ins, from scikit-learn (imported only when used): digits, breast_cancer, iris, wine,
  moons (1000 examples, noise 0.2), circles (1000 examples, noise 0.1, factor 0.5); the two
  generated sets are drawn with the program's seed.
- `.npz` with arrays `x` and `y`, always read with `allow_pickle=False`.
- `.csv` with a header row; `label=COLUMN` names the label column (the last column when no
  label is given; `label="a,b"` names several target columns for `real[K]`). Labels may be
  names (`setosa`, `yes`), mapped to class indices in the order of `class[a, b, ...]` when the
  program names its classes, else in sorted order.
- an image folder (`source "images/"`): one sub-folder per class, named after it; the PNG and
  JPEG files directly inside each are decoded with Pillow, converted to grey (C = 1) or RGB
  (C = 3), resized to the declared `float[C, H, W]` (bilinear) and scaled to [0, 1]. Class
  names are the folder names, in the order of `class[a, b, ...]` when the program names its
  classes, else sorted (for a binary output the first name is 0). Other files are skipped.
  Every image is decoded before the run starts: the files that cannot be decoded are listed
  with their paths and nothing trains; an image of more than MAX_IMAGE_PIXELS pixels is
  refused as a possible decompression bomb (its header is read, never its pixels).
- text sources and token ids (`tokens` inputs or outputs): `runtime/text.py`.
A flat source whose width equals C·H·W is reshaped to a declared image input `float[C, H, W]`.

Splits (all shuffled with `np.random.default_rng(seed)`; for `class` and `binary` outputs
every class is split in the same proportions: each split's count of each class is within one
example of its ideal share, and each split's size is n·fraction rounded by largest remainder,
ties to the earlier split in train, dev, test order — see `stratified_counts`):
- one source: `split train dev test` of it (default 0.8 / 0.1 / 0.1).
- `train_dev F`: a fraction F of the train split becomes the training-dev split.
- `dev_source FILE`: data of the distribution that matters (the notes' "phone pictures"),
  split 50/50 as the notes describe: one half is mixed into the train split, the other half
  is cut 50/50 into dev and test (all stratified). So dev and test come only from that
  distribution, and the model sees some of it in training. When the block writes no
  `split`, the primary source is all train. When it writes one, the primary source is split
  as written and its dev and test parts join the dev and test parts of the other file (first
  the primary's examples, then the other file's).
- `test_source FILE`: test is all of that file (and with `dev_source` as well, the dev file is
  split 50/50 into train and dev). When no `split` is written, the primary source is split
  into train and dev with the default fractions, the test share going to train (0.9 / 0.1).
- `train_dev F` is carved out of the train split after the mixing, so train and train-dev
  share one distribution, and dev − train-dev measures the data mismatch.
Whether a `split` was written is read from its span (the default `Split()` has none).

Errors in the data are `DlnError`s that name the data file (and the row, or the CSV line,
where there is one) and say what to fix. When the source statement has a span the error
points at it (`span=source.span`, `path=program_path`; the caller may fill the program's path
and text with `DlnError.located`); without a span the error's path is the data file itself.
Nothing is written anywhere.

`normalization`, `batch_indices` and `load_features` (for `dlnc predict`) complete the layer.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from dsl.errors import DlnError, Span, did_you_mean

if TYPE_CHECKING:                        # only the annotations name the AST's classes
    from dsl import ast

BUILTINS = ("digits", "breast_cancer", "iris", "wine", "moons", "circles")
STD_FLOOR = 1e-8          # a feature whose σ is below this is left unscaled (σ := 1)


# ---------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class Dataset:
    """One split: x float32 `(n, *input.shape)`; y int64 `(n,)` (class), float32 `(n,)` of
    0/1 (binary) or float32 `(n, K)` (real)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True, eq=False)
class Splits:
    """The splits of a `data` block; dev, test and train_dev are None when empty or absent.

    `classes` names the class indices (binary: the names of 0 and 1; real: empty);
    `source_hash` identifies the data (sha256 hex), for the exported model's metadata."""

    train: Dataset
    dev: Dataset | None
    test: Dataset | None
    train_dev: Dataset | None
    classes: tuple[str, ...]
    source_hash: str
    dev_distribution: str = "same"       # "other": dev holds examples of dev_source
    test_distribution: str = "same"      # "other": test holds examples of dev_source or test_source
    vocab: tuple[str, ...] = ()          # token data: the vocabulary, ids are positions (runtime/text.py)


@dataclass(frozen=True, eq=False)
class Normalization:
    """Per-feature μ and σ of the train split; the model computes `(x − μ) / σ`."""

    mean: np.ndarray
    std: np.ndarray


# ---------------------------------------------------------------- where an error points
@dataclass(frozen=True)
class _Where:
    """A data source as errors name it: `name` for messages, the file for `path`, and the
    span of its statement in the .dln (with the program's path) when there is one."""

    name: str                            # "data file 'train.npz'" or "built-in data set 'iris'"
    file: str | None                     # the resolved data file, None for built-ins
    span: Span | None
    program_path: str | None
    lines: np.ndarray | None = None      # CSV: the file line of each example
    files: tuple[str, ...] | None = None  # image folders: the file of each example

    def error(self, message: str) -> DlnError:
        text = f"{self.name}: {message}"
        if self.span is not None:
            return DlnError(text, span=self.span, path=self.program_path)
        return DlnError(text, path=self.file or self.program_path)

    def row(self, i: int) -> str:
        """How a message names example i: its CSV line, or its row in the arrays."""
        if self.lines is not None:
            return f"line {int(self.lines[i])}"
        if self.files is not None:
            return self.files[i]
        return f"row {i}"


@dataclass(frozen=True, eq=False)
class _Raw:
    """A source as read, before checks: x numeric `(n, ...)`, y numbers or strings `(n, ...)`."""

    x: np.ndarray
    y: np.ndarray
    where: _Where
    digest: str                          # sha256 hex of the bytes (or of the built-in's identity)
    names: tuple[str, ...] = ()          # class names the source gives (sklearn's target_names)


# ---------------------------------------------------------------- load_splits
def load_splits(data: ast.Data, input: ast.InputDecl, output: ast.OutputDecl,
                base_dir: Path, seed: int, *, program_path: str | None = None) -> Splits:
    """Read, check and split the examples of a `data` block (see the module docstring)."""
    from . import text
    if text.uses_tokens(data, input, output):                  # text files and token ids: runtime/text.py
        return text.load_token_splits(data, input, output, base_dir, seed, program_path=program_path)
    _check_supported(data, input, output, program_path)
    _check_fractions(data, program_path)
    base_dir = Path(base_dir)
    primary = _read_source(data.source, base_dir, seed, program_path, input)
    dev_raw = (_read_source(data.dev_source, base_dir, seed, program_path, input)
               if data.dev_source else None)
    test_raw = (_read_source(data.test_source, base_dir, seed, program_path, input)
                if data.test_source else None)
    raws = [r for r in (primary, dev_raw, test_raw) if r is not None]

    classes, encode = _class_encoding(raws, output, program_path, data.source.span)
    primary_set, dev_set, test_set = (
        _dataset(r, input, output, encode) if r is not None else None
        for r in (primary, dev_raw, test_raw))

    rng = np.random.default_rng(seed)
    stratify = output.kind in ("class", "binary")
    fractions = _primary_fractions(data)
    train, dev, test = _split(primary_set, fractions, rng, stratify)
    if dev_set is not None and test_set is None:
        mixed, extra_dev, extra_test = _split(dev_set, (0.5, 0.25, 0.25), rng, stratify)
        train = _concat(train, mixed)
        dev, test = _concat(dev, extra_dev), _concat(test, extra_test)
    elif dev_set is not None:
        mixed, extra_dev = _split(dev_set, (0.5, 0.5), rng, stratify)
        train, dev = _concat(train, mixed), _concat(dev, extra_dev)
    if test_set is not None:
        test = _concat(test, test_set)
    if train is not None and dev_set is not None:
        train = _shuffled(train, rng)                 # the mixed-in examples spread over train

    if train is None:
        raise primary.where.error(
            f"the train split is empty ({len(primary_set)} examples, train={fractions[0]}) "
            "— give more examples or a larger train fraction")
    train_dev = None
    if data.train_dev > 0:
        train, train_dev = _split(train, (1.0 - data.train_dev, data.train_dev), rng, stratify)
        if train is None:
            raise primary.where.error(
                f"train_dev {data.train_dev} leaves no training examples "
                "— use a smaller fraction")
    return Splits(train=train, dev=dev, test=test, train_dev=train_dev, classes=classes,
                  source_hash=_combined_hash([r.digest for r in raws]),
                  dev_distribution="other" if dev_raw is not None else "same",
                  test_distribution="other" if (dev_raw or test_raw) is not None else "same")


def _check_supported(data: ast.Data, input: ast.InputDecl, output: ast.OutputDecl,
                     program_path: str | None) -> None:
    """Text data, and token inputs or outputs, come later; image folders need image inputs."""
    for source in (data.source, data.dev_source, data.test_source):
        if source is not None and source.kind == "text":
            raise DlnError(f"text sources are not available yet ('{source.path}') — "
                           "use a built-in data set, an .npz or a .csv file, or a folder of images",
                           span=source.span, path=program_path)
    if input.kind != "float" or output.kind not in ("class", "binary", "real"):
        raise DlnError("token inputs and outputs need text sources, which are not available yet",
                       span=(input.span if input.kind != "float" else output.span),
                       path=program_path)
    for source in (data.source, data.dev_source, data.test_source):
        if source is not None and source.kind == "images" and \
                (len(input.shape) != 3 or input.shape[0] not in (1, 3)):
            shape = ", ".join(map(str, input.shape))
            raise DlnError(f"an image folder ('{source.path}') needs an image input, "
                           f"`{input.name}: float[C, H, W]` with C = 1 (grey) or 3 (RGB), "
                           f"not float[{shape}]",
                           span=input.span or source.span, path=program_path)


def _check_fractions(data: ast.Data, program_path: str | None) -> None:
    """split fractions are in [0, 1] and add up to 1; train_dev is in [0, 1)."""
    s = data.split
    if min(s.train, s.dev, s.test) < 0 or not math.isclose(s.train + s.dev + s.test, 1.0,
                                                           abs_tol=1e-6):
        raise DlnError(f"split fractions must be at least 0 and add up to 1 "
                       f"(train={s.train} dev={s.dev} test={s.test})",
                       span=s.span or data.span, path=program_path)
    if not 0 <= data.train_dev < 1:
        raise DlnError(f"train_dev must be a fraction in [0, 1), not {data.train_dev}",
                       span=data.spans.get("train_dev", data.span), path=program_path)


def _primary_fractions(data: ast.Data) -> tuple[float, float, float]:
    """(train, dev, test) fractions of the primary source (see the module docstring)."""
    s = data.split
    written = s.span is not None or "split" in data.spans
    if written or (data.dev_source is None and data.test_source is None):
        return (s.train, s.dev, s.test)
    if data.dev_source is not None:
        return (1.0, 0.0, 0.0)
    return (s.train + s.test, s.dev, 0.0)


def _combined_hash(digests: Sequence[str]) -> str:
    """One source: its own digest; several: the sha256 of their digests joined."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


# ---------------------------------------------------------------- reading sources
def _read_source(source: ast.Source, base_dir: Path, seed: int,
                 program_path: str | None, input: ast.InputDecl | None = None) -> _Raw:
    """A source's arrays as stored, with its digest; no checks of their content yet."""
    if source.kind == "builtin":
        return _read_builtin(source, seed, program_path)
    path = Path(source.path)
    file = path if path.is_absolute() else base_dir / path
    if source.kind == "images":
        return _read_image_folder(source, file, tuple(input.shape), program_path)
    where = _Where(f"data file '{source.path}'", str(file), source.span, program_path)
    blob = _read_bytes(file, where)
    digest = hashlib.sha256(blob).hexdigest()
    if source.kind == "npz":
        x, y = _parse_npz(blob, where)
        return _Raw(x, y, where, digest)
    if source.kind == "csv":
        label_columns = _label_columns(source.label)
        x, y, lines = _parse_csv_table(blob, label_columns, where)
        return _Raw(x, y, _with_lines(where, lines), digest)
    raise where.error(f"unknown kind of source '{source.kind}' — use a built-in name, "
                      "an .npz or a .csv file")


def _with_lines(where: _Where, lines: np.ndarray) -> _Where:
    return _Where(where.name, where.file, where.span, where.program_path, lines)


def _read_bytes(file: Path, where: _Where) -> bytes:
    if not file.exists():
        hint = "; relative paths start at the folder of the .dln file" if where.program_path else ""
        raise where.error(f"the file does not exist (looked for {file}) — check the path{hint}")
    if file.is_dir():
        raise where.error(f"{file} is a folder, not a data file")
    try:
        return file.read_bytes()
    except OSError as e:
        raise where.error(f"cannot read {file}: {e.strerror or e}") from None


def _read_builtin(source: ast.Source, seed: int, program_path: str | None) -> _Raw:
    """A scikit-learn data set: (x, y, target names) and a digest of its identity."""
    name = source.path
    where = _Where(f"built-in data set '{name}'", None, source.span, program_path)
    if name not in BUILTINS:
        raise where.error(f"there is no such built-in data set{did_you_mean(name, BUILTINS)} "
                          f"(built-ins: {', '.join(BUILTINS)})")
    import sklearn
    from sklearn import datasets

    identity = f"builtin:{name}:sklearn-{sklearn.__version__}"
    if name == "moons":
        x, y = datasets.make_moons(n_samples=1000, noise=0.2, random_state=seed)
        names: tuple[str, ...] = ()
        identity += f":n=1000:noise=0.2:seed={seed}"
    elif name == "circles":
        x, y = datasets.make_circles(n_samples=1000, noise=0.1, factor=0.5, random_state=seed)
        names = ()
        identity += f":n=1000:noise=0.1:factor=0.5:seed={seed}"
    else:
        bunch = getattr(datasets, f"load_{name}")()
        x, y = bunch.data, bunch.target
        names = tuple(str(t) for t in bunch.target_names)
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return _Raw(np.asarray(x), np.asarray(y), where, digest, names)


# ---------------------------------------------------------------- image folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 40_000_000   # width × height above this is refused as a decompression bomb
MAX_LISTED = 20                 # problems listed by name before "and N more"


def _read_image_folder(source: ast.Source, folder: Path, shape: tuple[int, ...],
                       program_path: str | None) -> _Raw:
    """One sub-folder per class; every PNG or JPEG in it decoded, converted and resized to
    `shape` (C, H, W), values in [0, 1]. Undecodable files and bombs are listed together."""
    where = _Where(f"image folder '{source.path}'", str(folder), source.span, program_path)
    if not folder.exists():
        raise where.error(f"the folder does not exist (looked for {folder}) — check the path; "
                          "relative paths start at the folder of the .dln file")
    if not folder.is_dir():
        raise where.error(f"{folder} is a file, not a folder of images")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
        classes = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
        stray = [f.name for f in entries if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        files = [(d.name, f) for d in classes
                 for f in sorted(d.iterdir(), key=lambda p: p.name)
                 if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    except OSError as e:
        raise where.error(f"cannot list {folder}: {e.strerror or e}") from None
    if stray:
        raise where.error(f"holds images outside the class sub-folders ({_listing(stray)}) — "
                          "put each image in the sub-folder named after its class")
    if not classes:
        raise where.error("has no sub-folders — put the images of each class in a sub-folder "
                          "named after the class (images/cat/1.png, images/dog/2.jpg)")
    empty = [d.name for d in classes if not any(name == d.name for name, _ in files)]
    if empty:
        raise where.error(f"class folder{'s' if len(empty) > 1 else ''} {_listing(empty)} "
                          "hold no PNG or JPEG images")
    digest = hashlib.sha256()
    images, labels, names, problems = [], [], [], []
    with _pillow_limits():
        for label, file in files:
            relative = f"{label}/{file.name}"
            try:
                blob = file.read_bytes()
            except OSError as e:
                problems.append(f"{file}: cannot be read ({e.strerror or e})")
                continue
            digest.update(f"{relative}\0{hashlib.sha256(blob).hexdigest()}\n".encode())
            pixels, problem = _decode_image(blob, shape)
            if problem is not None:
                problems.append(f"{file}: {problem}")
                continue
            images.append(pixels)
            labels.append(label)
            names.append(str(file))
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise where.error(f"{len(problems)} of {len(files)} image{'s' if len(files) > 1 else ''} "
                          f"cannot be used — remove or replace them:\n  {shown}{more}")
    x = np.stack(images).astype(np.float32)
    return _Raw(x, np.array(labels, dtype=str), _Where(where.name, where.file, where.span,
                                                       where.program_path, files=tuple(names)),
                digest.hexdigest())


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


@contextlib.contextmanager
def _pillow_limits():
    """Pillow's pixel limit set to MAX_IMAGE_PIXELS, and its bomb warning raised as an error;
    both restored afterwards."""
    from PIL import Image
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode_image(blob: bytes, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """(pixels (C, H, W) float32 in [0, 1], None), or (None, why the image cannot be used)."""
    from PIL import Image
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(blob), formats=("PNG", "JPEG")) as image:
            image.load()
            converted = image.convert("L" if channels == 1 else "RGB")
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"refused as a possible decompression bomb ({_bomb_size(e)})"
    except Exception as e:                       # Pillow raises many kinds for damaged files
        reason = str(e).strip() or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not a PNG or JPEG image"
        return None, f"cannot be decoded ({reason})"
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels), None


def _bomb_size(exc: Exception) -> str:
    """Pillow's message names the pixel count; say the limit too."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"{size}, more than the {MAX_IMAGE_PIXELS:,} dlnc accepts"


def _parse_npz(blob: bytes, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """Arrays x and y of an .npz archive, never unpickling anything."""
    try:
        archive = np.load(io.BytesIO(blob), allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error):
        raise where.error("is not a readable .npz archive (truncated, or another format) — "
                          "save it with np.savez(path, x=..., y=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise where.error("holds a single .npy array, not an .npz archive — "
                          "save it with np.savez(path, x=..., y=...)")
    with archive:
        return _npz_array(archive, "x", where), _npz_array(archive, "y", where)


def _npz_array(archive, key: str, where: _Where) -> np.ndarray:
    if key not in archive.files:
        has = ", ".join(archive.files) or "nothing"
        raise where.error(f"has no array '{key}' (it holds: {has}) — "
                          "save it with np.savez(path, x=features, y=labels)")
    try:
        return archive[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise where.error(f"array '{key}' holds Python objects, which dlnc never unpickles "
                              "— store numbers (or, for labels, strings) in it") from None
        raise where.error(f"array '{key}' is damaged ({e}) — save the file again") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error):
        raise where.error(f"array '{key}' is truncated or damaged — "
                          "save the file again") from None


# ---------------------------------------------------------------- CSV
def _label_columns(label: str | None) -> tuple[str, ...]:
    """`label=a` → ("a",); `label="a,b"` → ("a", "b"); none → () (the last column)."""
    if not label:
        return ()
    return tuple(c.strip() for c in label.split(",") if c.strip())


def _csv_rows(blob: bytes, where: _Where) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file, each with its line number (from 1)."""
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise where.error(f"is not UTF-8 text (byte {e.start}) — save it as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as e:
        raise where.error(f"line {reader.line_num}: not valid CSV ({e})") from None
    return rows


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _parse_number(cell: str, line: int, column: str, where: _Where) -> float:
    try:
        return float(cell)
    except ValueError:
        shown = f"'{cell}'" if cell else "an empty cell"
        raise where.error(f"line {line}, column '{column}': {shown} is not a number — "
                          "features must be numeric (encode categories as numbers, "
                          "or drop the column)") from None


def _check_ragged(cells: list[str], width: int, line: int, where: _Where) -> None:
    if len(cells) != width:
        raise where.error(f"line {line} has {len(cells)} cells but the header has {width} "
                          f"(first cell: '{cells[0] if cells else ''}') — every row needs one "
                          "cell per column")


def _parse_csv_table(blob: bytes, label_columns: tuple[str, ...], where: _Where
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float64 (n, d), labels as strings (n, k), line of each example)."""
    rows = _csv_rows(blob, where)
    if not rows:
        raise where.error("is empty — it needs a header row and one row per example")
    (_, header), body = rows[0], rows[1:]
    if all(_is_number(c) for c in header):
        raise where.error("has no header row — the first line must name the columns "
                          "(label=COLUMN picks the label)")
    labels = label_columns or (header[-1],)
    for name in labels:
        if name not in header:
            raise where.error(f"has no column '{name}'{did_you_mean(name, header)} "
                              f"(columns: {', '.join(header)})")
    label_at = [header.index(name) for name in labels]
    feature_at = [i for i in range(len(header)) if i not in label_at]
    if not feature_at:
        raise where.error("has no feature columns besides the label")
    if not body:
        raise where.error("has a header but no examples")
    x = np.empty((len(body), len(feature_at)), dtype=np.float64)
    y = np.empty((len(body), len(label_at)), dtype=object)
    lines = np.empty(len(body), dtype=np.int64)
    for r, (line, cells) in enumerate(body):
        _check_ragged(cells, len(header), line, where)
        x[r] = [_parse_number(cells[i], line, header[i], where) for i in feature_at]
        y[r] = [cells[i] for i in label_at]
        lines[r] = line
    return x, _labels_from_strings(y), lines


def _labels_from_strings(cells: np.ndarray) -> np.ndarray:
    """CSV label cells: float64 when every cell is a number, else strings; (n,) for one column."""
    flat = cells.ravel().tolist()
    if all(_is_number(c) for c in flat):
        y = np.array([float(c) for c in flat], dtype=np.float64).reshape(cells.shape)
    else:
        y = np.array(flat, dtype=str).reshape(cells.shape)
    return y[:, 0] if y.shape[1] == 1 else y


# ---------------------------------------------------------------- labels and classes
def _class_encoding(raws: Sequence[_Raw], output: ast.OutputDecl, program_path: str | None,
                    span: Span | None
                    ) -> tuple[tuple[str, ...], Callable[[_Raw], np.ndarray]]:
    """The class names, and a function from a source's raw labels to numbers.

    Named labels map to the index of their name: in `class[a, b, ...]` when the program names
    its classes, else in the sorted order of every name found in all sources."""
    if output.kind == "real":
        return (), _numeric_labels
    count = 2 if output.kind == "binary" else output.size
    named = [r for r in raws if r.y.dtype.kind in "US"]
    if not named:
        given = output.labels or next((r.names for r in raws if r.names), ())
        return _pad_names(given, count), _numeric_labels
    names = tuple(output.labels) or tuple(sorted({str(v) for r in raws for v in r.y.ravel()}))
    if len(names) > count:
        kind = "binary" if output.kind == "binary" else f"class[{output.size}]"
        raise DlnError(f"the labels name {len(names)} classes ({', '.join(names[:12])}) "
                       f"but the output is `{output.name}: {kind}` — declare "
                       f"class[{len(names)}] or fix the labels",
                       span=output.span or span, path=program_path)
    index = {name: i for i, name in enumerate(names)}

    def encode(raw: _Raw) -> np.ndarray:
        y = raw.y.astype(str)
        if y.ndim != 1:
            raise raw.where.error(f"labels have shape {y.shape}; a {output.kind} output needs "
                                  "one label per example (one label column)")
        for i, v in enumerate(y):
            if v not in index:
                raise raw.where.error(f"{raw.where.row(i)}: label '{v}' is not one of the "
                                      f"classes {', '.join(names)}{did_you_mean(v, names)}")
        return np.array([index[v] for v in y], dtype=np.float64)

    return _pad_names(names, count), encode


def _numeric_labels(raw: _Raw) -> np.ndarray:
    if raw.y.dtype.kind in "US":
        rows = np.atleast_2d(raw.y.T).T if raw.y.ndim == 1 else raw.y.reshape(len(raw.y), -1)
        for i, row in enumerate(rows):
            for v in row:
                if not _is_number(str(v)):
                    raise raw.where.error(f"{raw.where.row(i)}: target '{v}' is not a number "
                                          "— real outputs need numeric targets")
    if raw.y.dtype.kind not in "biuf":
        raise raw.where.error(f"labels have type {raw.y.dtype}, not numbers — store numbers "
                              "(or names for class outputs) in y")
    return raw.y.astype(np.float64)


def _pad_names(names: Sequence[str], count: int) -> tuple[str, ...]:
    """Exactly `count` names: the given ones, then the index of each unnamed class."""
    names = tuple(str(n) for n in names)[:count]
    return names + tuple(str(i) for i in range(len(names), count))


def _check_labels(y: np.ndarray, output: ast.OutputDecl, where: _Where) -> np.ndarray:
    """Labels in the layout and type of the output (see `Dataset`)."""
    n = len(y)
    if output.kind == "real":
        y2 = y.reshape(n, -1) if y.ndim != 2 else y
        if y.ndim > 2 or y2.shape[1] != output.size:
            width = "x".join(map(str, y.shape[1:])) or "1"
            raise where.error(f"targets have width {width} but "
                              f"`{output.name}: real[{output.size}]` declares {output.size} "
                              "— change the declaration or the data")
        bad = np.flatnonzero(~np.isfinite(y2).all(axis=1))
        if bad.size:
            raise where.error(f"{where.row(int(bad[0]))}: the target is NaN or Inf — "
                              "clean or drop that example")
        return y2.astype(np.float32)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise where.error(f"labels have shape {y.shape}; a {output.kind} output needs one "
                          "label per example, shaped (n,)")
    if output.kind == "binary":
        bad = np.flatnonzero((y != 0) & (y != 1))
        if bad.size:
            i = int(bad[0])
            raise where.error(f"{where.row(i)}: label {_show(y[i])} is not 0 or 1 — "
                              f"`{output.name}: binary` needs labels 0 and 1")
        return y.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
    if bad.size:
        i = int(bad[0])
        raise where.error(f"{where.row(i)}: label {_show(y[i])} is not a whole number — "
                          f"class labels must be integers 0..{output.size - 1}")
    bad = np.flatnonzero((y < 0) | (y >= output.size))
    if bad.size:
        i = int(bad[0])
        top = int(y.max())
        raise where.error(f"{where.row(i)}: label {_show(y[i])} is outside 0..{output.size - 1} "
                          f"of `{output.name}: class[{output.size}]` — fix the label"
                          + (f" or declare class[{top + 1}]" if top >= output.size else ""))
    return y.astype(np.int64)


def _show(v) -> str:
    """A label as a message shows it: 3, not 3.0."""
    v = float(v)
    return str(int(v)) if math.isfinite(v) and v == int(v) else repr(v)


# ---------------------------------------------------------------- features
def _check_features(x: np.ndarray, input: ast.InputDecl, where: _Where) -> np.ndarray:
    """Features float32, shaped (n, *input.shape), every value finite."""
    if x.dtype.kind not in "biuf":
        raise where.error(f"features have type {x.dtype}, not numbers — store numbers in x")
    x = _reshape_features(x, input, where)
    with np.errstate(over="ignore"):                 # beyond float32's range: Inf, caught below
        x = x.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise where.error(f"{where.row(int(bad[0]))}: the features hold NaN or Inf "
                          f"({int(bad.size)} example{'s' if bad.size > 1 else ''} in all) — "
                          "clean or drop those examples")
    return x


def _reshape_features(x: np.ndarray, input: ast.InputDecl, where: _Where) -> np.ndarray:
    """x as (n, *input.shape): the same shape, a flat width equal to C·H·W, or (n, H, W)
    for a one-channel image."""
    n, shape = len(x), tuple(input.shape)
    example = x.shape[1:] if x.ndim > 1 else (1,)
    if example == shape:
        return x.reshape((n, *shape))
    flat = len(example) == 1
    one_channel = len(shape) == 3 and shape[0] == 1 and example == shape[1:]
    if (flat or one_channel) and math.prod(example) == math.prod(shape):
        return x.reshape((n, *shape))
    declared = f"`{input.name}: float[{', '.join(map(str, shape))}]`"
    if flat:
        raise where.error(f"examples have {example[0]} features but {declared} declares "
                          f"{math.prod(shape)} — change the declaration or the data")
    raise where.error(f"examples have shape {list(example)} but {declared} declares "
                      f"{list(shape)} — change the declaration or reshape the data")


def _dataset(raw: _Raw, input: ast.InputDecl, output: ast.OutputDecl,
             encode: Callable[[_Raw], np.ndarray]) -> Dataset:
    """A checked source: lengths agree, features finite and shaped, labels valid."""
    x, y, where = raw.x, raw.y, raw.where
    if x.ndim == 0 or y.ndim == 0:
        raise where.error("x and y must be arrays with one entry per example")
    if len(x) != len(y):
        raise where.error(f"x has {len(x)} examples but y has {len(y)} — "
                          "they need one label per example")
    if len(x) == 0:
        raise where.error("holds no examples")
    return Dataset(_check_features(x, input, where), _check_labels(encode(raw), output, where))


# ---------------------------------------------------------------- splitting
def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """n cut into parts of the given fractions: floors, then the remainder one by one to the
    largest fractional parts (ties to the earlier part). Each part is within 1 of n·f."""
    ideal = [n * f for f in fractions]
    counts = [math.floor(v + 1e-9) for v in ideal]
    order = sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_counts(class_sizes: Sequence[int], fractions: Sequence[float]) -> np.ndarray:
    """(classes, parts) counts: each class cut in the given fractions, every count within 1
    of its ideal share, and each part's total equal to `split_counts(n, fractions)`.

    Controlled rounding: start from the floors; each class (most examples left first) then
    rounds up as many of its parts as it has examples left, choosing the parts that still lack
    the most examples (Ryser's greedy), then the largest fractional part, then the earlier
    part. The first try rounds up only parts with a fractional share (every count strictly
    within 1); should a try miss the totals, the next relaxes, and the last rounds each class
    on its own (totals then within one per class)."""
    sizes = np.asarray(class_sizes, dtype=np.int64)
    ideal = np.outer(sizes, np.asarray(fractions, dtype=np.float64))
    floors = np.floor(ideal + 1e-9).astype(np.int64)
    totals = np.asarray(split_counts(int(sizes.sum()), fractions))
    for strict in (True, False):
        counts = _round_up_rows(sizes, ideal, floors, totals, strict)
        if counts is not None:
            return counts
    return np.array([split_counts(int(m), fractions) for m in sizes], dtype=np.int64)


def _round_up_rows(sizes: np.ndarray, ideal: np.ndarray, floors: np.ndarray,
                   totals: np.ndarray, strict: bool) -> np.ndarray | None:
    """One try of `stratified_counts`' greedy; None when the part totals are missed."""
    counts = floors.copy()
    need = totals - floors.sum(axis=0)               # examples each part still lacks
    rest = ideal - floors                            # fractional shares, in [0, 1)
    left = sizes - floors.sum(axis=1)                # examples each class still has to place
    for c in np.argsort(-left, kind="stable"):
        order = sorted(range(len(totals)),
                       key=lambda j: (strict and rest[c, j] <= 1e-9, -need[j], -rest[c, j], j))
        for j in order[: left[c]]:
            counts[c, j] += 1
            need[j] -= 1
    return counts if (need == 0).all() else None


def _split_indices(y: np.ndarray | None, n: int, fractions: Sequence[float],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Index sets of each part; stratified by label when y is given, each part shuffled."""
    groups = [np.arange(n)] if y is None else [np.flatnonzero(y == c) for c in np.unique(y)]
    table = stratified_counts([len(g) for g in groups], fractions)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for group, counts in zip(groups, table):
        group = rng.permutation(group)
        bounds = np.cumsum([0, *counts])
        for k in range(len(fractions)):
            parts[k].append(group[bounds[k]:bounds[k + 1]])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _split(ds: Dataset | None, fractions: Sequence[float], rng: np.random.Generator,
           stratify: bool) -> list[Dataset | None]:
    """A dataset cut into parts of the given fractions (None for an empty part)."""
    if ds is None:
        return [None] * len(fractions)
    parts = _split_indices(ds.y if stratify else None, len(ds), fractions, rng)
    return [Dataset(ds.x[i], ds.y[i]) if len(i) else None for i in parts]


def _shuffled(ds: Dataset, rng: np.random.Generator) -> Dataset:
    order = rng.permutation(len(ds))
    return Dataset(ds.x[order], ds.y[order])


def _concat(a: Dataset | None, b: Dataset | None) -> Dataset | None:
    if a is None or b is None:
        return a if b is None else b
    return Dataset(np.concatenate([a.x, b.x]), np.concatenate([a.y, b.y]))


# ---------------------------------------------------------------- normalisation and batches
def normalization(x_train: np.ndarray) -> Normalization:
    """μ and σ over the train split (σ := 1 where σ < 1e-8: a constant feature).

    Features (N, F): one μ, σ per feature. Images (N, C, H, W): one per channel, shaped
    (C, 1, 1), as torchvision's Normalize. Per-pixel statistics would divide a border pixel
    that is almost always 0 by a σ near 0, so a stroke that augmentation shifts onto it
    becomes an input in the hundreds."""
    x = np.asarray(x_train, dtype=np.float64)
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    mean = x.mean(axis=axes, keepdims=True)[0]
    std = x.std(axis=axes, keepdims=True)[0]
    std = np.where(std < STD_FLOOR, 1.0, std)
    return Normalization(mean.astype(np.float32), std.astype(np.float32))


def batch_indices(n: int, batch_size: int | str, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch: a fresh permutation of range(n) cut into mini-batches of batch_size
    ("full": one batch of all n); the last batch may be smaller."""
    if batch_size == "full":
        size = max(n, 1)
    elif isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) \
            and batch_size > 0:
        size = int(batch_size)
    else:
        raise DlnError(f"batch_size must be a positive whole number or 'full', not {batch_size!r}")
    order = rng.permutation(n)
    return [order[i:i + size] for i in range(0, n, size)]


# ---------------------------------------------------------------- dlnc predict
def load_features(path) -> np.ndarray:
    """Features for `dlnc predict`, float32 (n, ...): an .npy array (a 1-D array is one
    example), an .npz's array `x`, or a .csv of numbers (a first row with no number in it is a
    header and is skipped)."""
    file = Path(path)
    where = _Where(f"input file '{path}'", str(file), None, None)
    blob = _read_bytes(file, where)
    suffix = file.suffix.lower()
    if suffix == ".npy":
        x = _parse_npy(blob, where)
    elif suffix == ".npz":
        x, _ = _parse_npz_x(blob, where)
    elif suffix == ".csv":
        x, lines = _parse_csv_features(blob, where)
        where = _with_lines(where, lines)
    else:
        raise where.error("is neither .npy, .npz nor .csv — save the inputs as one of those")
    if x.ndim == 1:
        x = x[None, :]
    if x.dtype.kind not in "biuf":
        raise where.error(f"holds {x.dtype} values, not numbers")
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    if len(x) == 0:
        raise where.error("holds no examples")
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise where.error(f"{where.row(int(bad[0]))}: the inputs hold NaN or Inf — "
                          "clean or drop that example")
    return x


def _parse_npy(blob: bytes, where: _Where) -> np.ndarray:
    try:
        x = np.load(io.BytesIO(blob), allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise where.error("holds Python objects, which dlnc never unpickles — "
                              "save a numeric array with np.save") from None
        raise where.error("is not a readable .npy array (truncated, or another format) — "
                          "save it with np.save") from None
    except (EOFError, OSError, zipfile.BadZipFile):
        raise where.error("is not a readable .npy array (truncated, or another format) — "
                          "save it with np.save") from None
    if not isinstance(x, np.ndarray):
        raise where.error("is an .npz archive, not an .npy array — name it .npz")
    return x


def _parse_npz_x(blob: bytes, where: _Where) -> tuple[np.ndarray, None]:
    try:
        archive = np.load(io.BytesIO(blob), allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error):
        raise where.error("is not a readable .npz archive (truncated, or another format)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise where.error("holds a single .npy array — name it .npy")
    with archive:
        return _npz_array(archive, "x", where), None


def _parse_csv_features(blob: bytes, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """A CSV of numbers, an optional header row (no cell a number) skipped."""
    rows = _csv_rows(blob, where)
    header: list[str] | None = None
    if rows and not any(_is_number(c) for c in rows[0][1]):
        header, rows = rows[0][1], rows[1:]
    if not rows:
        raise where.error("holds no examples")
    width = len(header) if header is not None else len(rows[0][1])
    names = header or [str(i) for i in range(width)]
    x = np.empty((len(rows), width), dtype=np.float64)
    lines = np.empty(len(rows), dtype=np.int64)
    for r, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise where.error(f"line {line} has {len(cells)} cells but "
                              f"{'the header' if header else 'the first row'} has {width} — "
                              "every row needs one cell per feature")
        x[r] = [_parse_number(c, line, names[i], where) for i, c in enumerate(cells)]
        lines[r] = line
    return x, lines
