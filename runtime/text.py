"""Token data: text files for language models, and arrays of token ids.

`load_token_splits` stands in for `runtime.data.load_splits` when a program reads a text source
or has a `tokens` input or output.

Text sources (`source "names.txt" text level=char|word`):
- The file is UTF-8 (a byte-order mark is skipped); every non-blank line is one example.
- Tokens: `level=char`, every character (spaces included) of the line as written; `level=word`,
  the line lower-cased, cut into words (letters, digits, apostrophes) and single punctuation marks.
- Vocabulary, read from the whole file: `<EOS>` (id 0), `<UNK>` (id 1), then the tokens by
  falling count (ties in code-point order). `vocab_size N` keeps N entries in all, the two
  specials included: the N − 2 most frequent tokens; the others read as `<UNK>`.
- Examples (lines) are shuffled with the seed and split by `split` (and `train_dev`).
- Each split is one stream: `<EOS>` first, then every example followed by `<EOS>`, so `<EOS>`
  both ends an example and starts the next. It is cut into windows of `sequence_length` T
  (default 32) inputs and the same tokens one step later as targets: x = s[k : k + T],
  y = s[k + 1 : k + T + 1], for k = o, o + T, o + 2T, ... The train split starts at a seeded
  random offset o in [0, T); dev and test at 0. The tail shorter than a window is left out.
- An empty file, a file with a single distinct token, or bytes that are not UTF-8 is a DlnError
  that names the file.

Arrays of token ids (`.npz` with `x` (n, T) whole numbers ≥ 0 and `y`): for `tokens` inputs with
`class[C]` or `binary` outputs (y one label per example) or `tokens per_step` outputs (y (n, T)).
The vocabulary is the ids 0 … V − 1, V from `vocab_size` or the largest id + 1; splits are
stratified for class and binary outputs, as in `runtime.data`.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from compiler.lower_sequence import DEFAULT_STEPS
from dsl.errors import DlnError

from . import data as tables
from .data import Dataset, Splits, split_counts

if TYPE_CHECKING:
    from dsl import ast

EOS, UNK = "<EOS>", "<UNK>"
SPECIALS = (EOS, UNK)
WORD = re.compile(r"[\w']+|[^\w\s]")
NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}'])")


# ---------------------------------------------------------------- tokens
def tokenize(line: str, level: str) -> list[str]:
    """The tokens of one line: its characters, or its lower-cased words and punctuation marks."""
    return list(line) if level == "char" else WORD.findall(line.lower())


def detokenize(tokens: Sequence[str], level: str) -> str:
    """Tokens back to text: characters joined; words joined by spaces, none before punctuation."""
    if level == "char":
        return "".join(tokens)
    return NO_SPACE_BEFORE.sub(r"\1", " ".join(tokens))


def build_vocabulary(examples: Sequence[Sequence[str]], size: int | None) -> tuple[str, ...]:
    """<EOS>, <UNK>, then the most frequent tokens (ties in code-point order), `size` entries at most."""
    counts = Counter(token for example in examples for token in example)
    ranked = sorted((t for t in counts if t not in SPECIALS), key=lambda t: (-counts[t], t))
    return SPECIALS + tuple(ranked if size is None else ranked[:size - len(SPECIALS)])


def encode(tokens: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """Token ids, int64; a token outside the vocabulary is <UNK>."""
    index = {t: i for i, t in enumerate(vocab)}
    unknown = index[UNK]
    return np.asarray([index.get(t, unknown) for t in tokens], dtype=np.int64)


def windows(examples: Sequence[np.ndarray], steps: int, offset: int = 0) -> Dataset | None:
    """The stream <EOS> e₁ <EOS> e₂ <EOS> … cut into (x, y) windows of `steps`, y one step ahead."""
    stream = np.concatenate([np.zeros(1, np.int64)] + [np.append(e, 0) for e in examples])   # <EOS> is id 0
    count = (len(stream) - 1 - offset) // steps
    if count < 1:
        return None
    index = offset + steps * np.arange(count)[:, None] + np.arange(steps + 1)[None, :]
    cut = stream[index]
    return Dataset(np.ascontiguousarray(cut[:, :-1]), np.ascontiguousarray(cut[:, 1:]))


# ---------------------------------------------------------------- loading
def uses_tokens(data: ast.Data, input: ast.InputDecl, output: ast.OutputDecl) -> bool:
    sources = (data.source, data.dev_source, data.test_source)
    return "tokens" in (input.kind, output.kind) or any(s is not None and s.kind == "text" for s in sources)


def load_token_splits(data: ast.Data, input: ast.InputDecl, output: ast.OutputDecl, base_dir: Path,
                      seed: int, *, program_path: str | None = None) -> Splits:
    """The splits of a program that reads text or token ids (see the module docstring)."""
    source = data.source
    span_path = {"span": source.span, "path": program_path}
    if data.dev_source is not None or data.test_source is not None:
        other = data.dev_source or data.test_source
        raise DlnError("dev_source and test_source are not available for token data; split the one source "
                       "with `split train=0.8 dev=0.1 test=0.1`", span=other.span, path=program_path)
    if input.kind != "tokens" and output.kind == "tokens":
        raise DlnError(f"output {output.name}: tokens per_step predicts the next token of a `tokens` input: declare "
                       f"`input {input.name}: tokens` and read text (source \"FILE.txt\" text)",
                       span=output.span or source.span, path=program_path)
    if input.kind != "tokens":
        raise DlnError(f"a text source gives token ids: declare `input {input.name}: tokens` (and an `embed DIM` or "
                       f"`one_hot` layer first)", span=input.span or source.span, path=program_path)
    if data.vocab_size is not None and data.vocab_size < 3:
        raise DlnError(f"vocab_size {data.vocab_size} leaves no room for tokens: the vocabulary holds <EOS> and "
                       f"<UNK> and at least one token, so write vocab_size 3 or more",
                       span=data.spans.get("vocab_size", data.span), path=program_path)
    if data.sequence_length is not None and data.sequence_length < 1:
        raise DlnError(f"sequence_length must be at least 1, not {data.sequence_length}",
                       span=data.spans.get("sequence_length", data.span), path=program_path)
    if source.kind == "text":
        if output.kind != "tokens":
            raise DlnError(f"a text source holds one example per line for a language model, `output {output.name}: "
                           f"tokens per_step`; for {output.kind} outputs store token ids and labels in an .npz "
                           f"(x (n, T) ids, y labels)", **span_path)
        return _text_splits(data, base_dir, seed, program_path)
    if source.kind != "npz":
        raise DlnError(f"token ids come from a text file (source \"FILE.txt\" text) or an .npz of ids (x (n, T)); "
                       f"'{source.path}' is neither", **span_path)
    return _array_splits(data, output, base_dir, seed, program_path)


def _where(source: ast.Source, base_dir: Path, program_path: str | None, what: str) -> tuple[Path, tables._Where]:
    path = Path(source.path)
    file = path if path.is_absolute() else Path(base_dir) / path
    return file, tables._Where(f"{what} '{source.path}'", str(file), source.span, program_path)


def _cut(n: int, data: ast.Data, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into train, dev, test, train_dev."""
    s = data.split
    order = rng.permutation(n)
    counts = split_counts(n, (s.train, s.dev, s.test))
    train, dev, test = np.split(order, np.cumsum(counts)[:-1])
    keep = split_counts(len(train), (1.0 - data.train_dev, data.train_dev))[0]
    return [train[:keep], dev, test, train[keep:]]


def read_examples(source: ast.Source, base_dir: Path, program_path: str | None
                  ) -> tuple[list[str], list[list[str]], bytes, tables._Where]:
    """The examples of a text file: its non-blank lines (stripped), their tokens, its bytes."""
    file, where = _where(source, base_dir, program_path, "text file")
    blob = tables._read_bytes(file, where)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise where.error(f"is not UTF-8 text (byte {e.start} cannot be decoded) — save it as UTF-8") from None
    level = source.level or "char"
    lines = [line.strip() for line in text.removeprefix("\ufeff").splitlines() if line.strip()]
    return lines, [tokenize(line, level) for line in lines], blob, where


def split_lines(count: int, data: ast.Data, seed: int) -> tuple[list[np.ndarray], np.random.Generator]:
    """Which lines go to train, dev, test and train_dev, and the generator, ready for the window offset."""
    rng = np.random.default_rng(seed)
    return _cut(count, data, rng), rng


def _text_splits(data: ast.Data, base_dir: Path, seed: int, program_path: str | None) -> Splits:
    lines, examples, blob, where = read_examples(data.source, base_dir, program_path)
    if not examples:
        raise where.error("is empty — a text source holds one example per line")
    distinct = {t for e in examples for t in e}
    if len(distinct) < 2:
        raise where.error(f"has a vocabulary of one token ({next(iter(distinct))!r}) — a language model needs at "
                          f"least two different tokens to choose between")
    vocab = build_vocabulary(examples, data.vocab_size)
    steps = data.sequence_length or DEFAULT_STEPS
    parts, rng = split_lines(len(examples), data, seed)
    encoded = [encode(e, vocab) for e in examples]
    offset = int(rng.integers(steps))
    train, dev, test, train_dev = (windows([encoded[i] for i in part], steps, offset if k == 0 else 0)
                                   for k, part in enumerate(parts))
    if train is None:
        tokens = sum(len(encoded[i]) + 1 for i in parts[0])
        raise where.error(f"the train split holds {len(parts[0])} lines, {tokens} tokens with <EOS>: too few for one "
                          f"window of sequence_length {steps} — give more text or a shorter sequence_length")
    return Splits(train=train, dev=dev, test=test, train_dev=train_dev, classes=(),
                  source_hash=hashlib.sha256(blob).hexdigest(), vocab=vocab)


def _array_splits(data: ast.Data, output: ast.OutputDecl, base_dir: Path, seed: int,
                  program_path: str | None) -> Splits:
    source = data.source
    file, where = _where(source, base_dir, program_path, "data file")
    blob = tables._read_bytes(file, where)
    x, y = tables._parse_npz(blob, where)
    if x.ndim != 2 or x.dtype.kind not in "biuf" or not np.all(np.isfinite(x)) or np.any(x != np.round(x)) \
            or np.any(x < 0):
        raise where.error(f"x must hold token ids, whole numbers ≥ 0 shaped (n, T); got {x.dtype} {x.shape}")
    x = x.astype(np.int64)
    if output.kind == "tokens":
        if y.shape != x.shape or y.dtype.kind not in "biuf" or np.any(y != np.round(y)) or np.any(y < 0):
            raise where.error(f"y must hold the next token ids, shaped like x {x.shape}; got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
        top = int(max(x.max(), y.max()))
    else:
        classes, encode_labels = tables._class_encoding([tables._Raw(x, y, where, "")], output, program_path,
                                                        source.span)
        y = tables._check_labels(encode_labels(tables._Raw(x, y, where, "")), output, where)
        top = int(x.max())
    vocab_size = data.vocab_size or top + 1
    if top >= vocab_size:
        raise where.error(f"holds token id {top}, outside vocab_size {vocab_size} (ids 0 … {vocab_size - 1})")
    stratify = output.kind in ("class", "binary")
    rng = np.random.default_rng(seed)
    s = data.split
    train, dev, test = tables._split(Dataset(x, y), (s.train, s.dev, s.test), rng, stratify)
    if train is None:
        raise where.error(f"the train split is empty ({len(x)} examples, train={s.train})")
    train_dev = None
    if data.train_dev > 0:
        train, train_dev = tables._split(train, (1.0 - data.train_dev, data.train_dev), rng, stratify)
    return Splits(train=train, dev=dev, test=test, train_dev=train_dev,
                  classes=() if output.kind == "tokens" else classes,
                  source_hash=hashlib.sha256(blob).hexdigest(), vocab=tuple(str(i) for i in range(vocab_size)))
