"""Token data (runtime/text.py): text files cut into seeded windows, vocabularies with <UNK> and
<EOS>, arrays of token ids, and the errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsl import ast
from dsl.errors import DlnError, Span
from runtime.data import load_splits
from runtime.text import EOS, UNK, build_vocabulary, detokenize, encode, tokenize, windows

SPAN = Span(2, 8, 2, 30)
TOKENS = ast.InputDecl("x", "tokens", ())
PER_STEP = ast.OutputDecl("y", "tokens", 0, per_step=True)


def text_data(name: str, level: str = "char", split=(0.8, 0.1, 0.1), **kw) -> ast.Data:
    return ast.Data(ast.Source("text", name, level=level, span=SPAN), ast.Split(*split), **kw)


def load(tmp_path: Path, content: str | bytes, data: ast.Data | None = None, seed: int = 0, **kw):
    file = tmp_path / "t.txt"
    file.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return load_splits(data or text_data("t.txt", **kw), TOKENS, PER_STEP, tmp_path, seed, program_path="m.dln")


def error(tmp_path: Path, content, **kw) -> DlnError:
    with pytest.raises(DlnError) as info:
        load(tmp_path, content, **kw)
    return info.value


NAMES = "\n".join(["anna", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy"] * 6) + "\n"


def test_tokens_of_each_level_and_back():
    assert tokenize("Ann B.", "char") == ["A", "n", "n", " ", "B", "."]
    assert tokenize("Ram ate an apple, didn't he?", "word") == ["ram", "ate", "an", "apple", ",", "didn't", "he", "?"]
    assert detokenize(["ram", "ate", "an", "apple", ",", "he", "?"], "word") == "ram ate an apple, he?"


def test_vocabulary_keeps_the_most_frequent_and_the_rest_is_unknown():
    vocab = build_vocabulary([list("aaabbc"), list("ab")], size=4)
    assert vocab == (EOS, UNK, "a", "b")
    assert encode(list("abcz"), vocab).tolist() == [2, 3, 1, 1]
    assert build_vocabulary([list("ba")], None) == (EOS, UNK, "a", "b")     # ties in code-point order


def test_windows_read_the_stream_one_step_ahead():
    data = windows([np.array([2, 3]), np.array([4])], steps=2)
    # stream: <EOS> 2 3 <EOS> 4 <EOS>  →  x (0 2)(3 0), y (2 3)(0 4)
    assert data.x.tolist() == [[0, 2], [3, 0]] and data.y.tolist() == [[2, 3], [0, 4]]
    assert windows([np.array([2])], steps=5) is None


def test_text_splits_are_windows_of_the_declared_length(tmp_path):
    s = load(tmp_path, NAMES, sequence_length=5)
    assert s.vocab[:2] == (EOS, UNK) and set(s.vocab[2:]) == set("".join(NAMES.split()))
    assert s.train.x.shape[1] == 5 and s.train.x.dtype == np.int64 and s.train.y.dtype == np.int64
    assert np.array_equal(s.train.x[:, 1:], s.train.y[:, :-1])         # y is x one step later
    assert s.dev is not None and s.test is not None and s.classes == ()
    assert (s.train.y == 0).any()                                      # <EOS> ends every name


def test_windows_are_seeded(tmp_path):
    a, b = load(tmp_path, NAMES, seed=3, sequence_length=4), load(tmp_path, NAMES, seed=3, sequence_length=4)
    c = load(tmp_path, NAMES, seed=4, sequence_length=4)
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.dev.x, b.dev.x)
    assert not (a.train.x.shape == c.train.x.shape and np.array_equal(a.train.x, c.train.x))


def test_vocab_size_maps_the_rare_tokens_to_unknown(tmp_path):
    s = load(tmp_path, "aaaa\nabab\nabc\nz\n", split=(1.0, 0.0, 0.0), sequence_length=3, vocab_size=4)
    assert s.vocab == (EOS, UNK, "a", "b")
    assert (s.train.y == 1).sum() == 2                                 # c and z


def test_word_level_reads_lower_cased_words(tmp_path):
    s = load(tmp_path, "Ram ate an apple.\nSita ate a mango.\n" * 5, level="word", sequence_length=4)
    assert {"ram", "ate", "apple", "."} <= set(s.vocab) and "Ram" not in s.vocab


@pytest.mark.parametrize("content,words", [
    ("", "is empty"),
    ("\n  \n\n", "is empty"),
    ("aaaa\naa\na\n", "vocabulary of one token ('a')"),
    (b"ab\n\xff\xfecd\n", "is not UTF-8 text (byte 3"),
])
def test_bad_text_files_are_errors_that_name_the_file(tmp_path, content, words):
    e = error(tmp_path, content)
    assert "text file 't.txt'" in e.message and words in e.message and e.span == SPAN and e.path == "m.dln"


def test_a_missing_text_file_and_too_little_text(tmp_path):
    data = text_data("nope.txt")
    with pytest.raises(DlnError, match="does not exist"):
        load_splits(data, TOKENS, PER_STEP, tmp_path, 0)
    assert "too few for one window" in error(tmp_path, "ab\nba\n", sequence_length=50).message
    assert "vocab_size 3 or more" in error(tmp_path, NAMES, vocab_size=2).message


def test_text_sources_need_a_tokens_program(tmp_path):
    (tmp_path / "t.txt").write_text(NAMES)
    with pytest.raises(DlnError, match="input x: tokens"):
        load_splits(text_data("t.txt"), ast.InputDecl("x", "float", (3,)), ast.OutputDecl("y", "class", 2),
                    tmp_path, 0)
    with pytest.raises(DlnError, match="one example per line for a language model"):
        load_splits(text_data("t.txt"), TOKENS, ast.OutputDecl("y", "class", 2), tmp_path, 0)


def test_token_ids_and_labels_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 9, size=(40, 6))
    np.savez(tmp_path / "ids.npz", x=x, y=(x[:, -1] > 4).astype(np.int64))
    data = ast.Data(ast.Source("npz", "ids.npz", span=SPAN), ast.Split(0.5, 0.5, 0.0))
    s = load_splits(data, TOKENS, ast.OutputDecl("y", "class", 2), tmp_path, 0)
    assert s.vocab == tuple(str(i) for i in range(int(x.max()) + 1)) and s.train.x.dtype == np.int64
    assert len(s.train) == 20 and set(s.train.y.tolist()) == {0, 1}
    np.savez(tmp_path / "bad.npz", x=x - 1, y=x[:, 0])
    with pytest.raises(DlnError, match="whole numbers ≥ 0"):
        load_splits(ast.Data(ast.Source("npz", "bad.npz", span=SPAN)), TOKENS, ast.OutputDecl("y", "class", 9),
                    tmp_path, 0)
