"""Language models end to end: `dlnc run` with perplexities, `dlnc sample`, `dlnc score` (recomputed by
hand from the model's outputs), and the two examples on short schedules."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from runtime.cli import main
from runtime.language import (load_language_model, rank_against_shuffled, shuffled_words, unigram_perplexity)
from conftest import EXAMPLES, with_epochs

TINY_LM = """model tiny_lm
data {{ source "names.txt" text level={level}; split train=0.8 dev=0.2; sequence_length 12 }}
input x: tokens
output y: tokens per_step
layers {{
  embed 8
  {cell} 24
  dense vocab softmax
}}
train {{ optimizer adam lr=0.01; batch_size 16; epochs 3; clip_norm 5.0 }}
"""


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A small character model of 800 names, trained once: (folder, run summary)."""
    folder = tmp_path_factory.mktemp("lm")
    names = (EXAMPLES / "names.txt").read_text().split()[::18]
    (folder / "names.txt").write_text("\n".join(names) + "\n")
    (folder / "lm.dln").write_text(TINY_LM.format(level="char", cell="gru"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(folder / "lm.dln"), "-o", str(folder / "run"), "--json"]) == 0
    return folder, json.loads(out.getvalue())


def test_run_reports_perplexity_below_the_unigram_baseline(tiny_lm):
    _, summary = tiny_lm
    result = summary["perplexity"]
    assert result["per"] == "character" and result["baseline_split"] == "dev"
    assert result["model"]["dev"] < result["unigram"]
    assert math.isclose(result["model"]["dev"], math.exp(summary["splits"]["dev"]["loss"] / 12), rel_tol=1e-9)


def test_run_prints_both_perplexities(tmp_path, dlnc):
    names = (EXAMPLES / "names.txt").read_text().split()[::40]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "lm.dln").write_text(with_epochs(TINY_LM.format(level="char", cell="lstm"), 1))
    result = dlnc("run", tmp_path / "lm.dln", "-o", tmp_path / "run")
    assert result.code == 0, result.err
    assert re.search(r"perplexity per character on dev: model [\d.]+, unigram baseline [\d.]+", result.out)


def test_exported_language_model_carries_its_vocabulary(tiny_lm):
    folder, _ = tiny_lm
    model = onnx.load(str(folder / "run" / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    vocab = json.loads(meta["dlnc.vocab"])
    assert vocab[:2] == ["<EOS>", "<UNK>"] and "a" in vocab and meta["dlnc.text_level"] == "char"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert "GRU" in {n.op_type for n in model.graph.node}


def test_score_is_the_product_of_the_conditional_probabilities(tiny_lm, dlnc):
    folder, _ = tiny_lm
    path = folder / "run" / "model.onnx"
    result = dlnc("score", path, "Anna")
    assert result.code == 0, result.err
    printed = float(re.search(r"= (-?[\d.]+)", result.out).group(1))
    # by hand: feed <EOS> A n n a, read P(A | <EOS>), P(n | <EOS> A), ..., P(<EOS> | <EOS> A n n a)
    model = onnx.load(str(path))
    vocab = json.loads({p.key: p.value for p in model.metadata_props}["dlnc.vocab"])
    ids = [vocab.index(c) for c in "Anna"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = session.run(None, {"x": np.array([[0] + ids], dtype=np.int64)})[0][0]
    conditionals = [p[t, target] for t, target in enumerate(ids + [0])]
    assert printed == pytest.approx(math.log(np.prod(np.float64(conditionals))), abs=1e-4)
    rows = [line.split() for line in result.out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["A", "n", "n", "a", "<EOS>"]
    for row, want in zip(rows, conditionals):
        assert float(row[1]) == pytest.approx(float(want), rel=1e-5)


def test_score_maps_unknown_tokens_and_needs_a_language_model(tiny_lm, dlnc, tmp_path):
    folder, _ = tiny_lm
    result = dlnc("score", folder / "run" / "model.onnx", "Zoë")
    assert result.code == 0 and "ë → <UNK>" in result.out
    not_lm = dlnc("score", folder / "run" / "train_step.onnx", "x")
    assert not_lm.code == 2 and "not a dlnc language model" in not_lm.err
    assert dlnc("score", tmp_path / "nope.onnx", "x").code == 2


def test_sample_is_seeded_starts_with_the_prefix_and_stops(tiny_lm, dlnc):
    folder, _ = tiny_lm
    path = folder / "run" / "model.onnx"
    first = dlnc("sample", path, "--seed", "7", "--start", "Ma")
    again = dlnc("sample", path, "--seed", "7", "--start", "Ma")
    assert first.code == 0 and first.out == again.out and first.out.startswith("Ma")
    short = dlnc("sample", path, "--seed", "1", "--length", "3", "--temperature", "0.5")
    assert short.code == 0 and len(short.out.rstrip("\n")) <= 3
    assert "<EOS>" not in first.out
    assert dlnc("sample", path, "--temperature", "0").code == 2
    assert dlnc("sample", path, "--length", "0").code == 2


def test_unigram_perplexity_by_hand():
    train, dev = np.array([[0, 1, 1, 2]]), np.array([[1, 2]])
    p = (np.bincount(train.ravel(), minlength=4) + 1) / (4 + 4)           # add-one: 1/8, 3/8, 2/8, 1/8
    assert unigram_perplexity(train, dev, 4) == pytest.approx(math.exp(-(math.log(p[1]) + math.log(p[2])) / 2))
    assert p[1] == 3 / 8 and p[2] == 2 / 8


def test_shuffled_words_keep_punctuation_and_change_the_order():
    rng = np.random.default_rng(0)
    tokens = ["ram", "ate", "an", "apple", "."]
    for _ in range(20):
        other = shuffled_words(tokens, rng)
        assert other[-1] == "." and sorted(other) == sorted(tokens) and other != tokens
    assert shuffled_words(["a", "a", "."], rng) is None


# ---------------------------------------------------------------- the examples, on short schedules
def test_names_example_beats_the_unigram_baseline_after_one_epoch(tmp_path, dlnc):
    source = tmp_path / "names_lm.dln"
    source.write_text(with_epochs((EXAMPLES / "names_lm.dln").read_text(), 1))
    (tmp_path / "names.txt").write_bytes((EXAMPLES / "names.txt").read_bytes())
    result = dlnc("run", source, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    perplexity = json.loads(result.out)["perplexity"]
    assert perplexity["model"]["dev"] < 0.6 * perplexity["unigram"]


def test_word_example_prefers_true_sentences_to_shuffled_ones(tmp_path, dlnc):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "devil_sentences.txt").write_bytes((EXAMPLES / "data" / "devil_sentences.txt").read_bytes())
    source = tmp_path / "devil_words.dln"
    source.write_text(with_epochs((EXAMPLES / "devil_words.dln").read_text(), 4))
    result = dlnc("run", source, "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["perplexity"]["per"] == "word"
    sys.path.insert(0, str(EXAMPLES))
    try:
        import sentence_pairs
    finally:
        sys.path.remove(str(EXAMPLES))
    share = sentence_pairs.main(str(source), str(tmp_path / "run" / "model.onnx"))
    assert share >= 0.8


def test_ranking_counts_pairs_and_ties_against_the_model(tiny_lm):
    folder, _ = tiny_lm
    model = load_language_model(folder / "run" / "model.onnx")
    share, pairs = rank_against_shuffled(model, ["Anna", "Bob", "aaa", "Carol"], count=2)
    assert pairs == 2 and 0.0 <= share <= 1.0


def test_many_to_one_from_token_ids_trains_and_predicts_at_any_length(tmp_path, dlnc):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(400, 10))
    np.savez(tmp_path / "seq.npz", x=x, y=((x == 3).sum(axis=1) > 2).astype(np.int64))
    (tmp_path / "m.dln").write_text(
        'model count_threes\ndata { source "seq.npz"; split train=0.8 dev=0.2 }\ninput x: tokens\n'
        "output y: binary\nlayers { one_hot; rnn 16 relu; last; dense 1 sigmoid }\n"
        "train { optimizer adam lr=0.01; batch_size 32; epochs 25 }\n")
    result = dlnc("run", tmp_path / "m.dln", "-o", tmp_path / "run", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["splits"]["dev"]["error"] < 0.15
    np.save(tmp_path / "ids.npy", np.array([[3, 3, 3, 3, 1], [0, 1, 2, 4, 0]]))        # length 5, trained on 10
    predicted = dlnc("predict", tmp_path / "run" / "model.onnx", tmp_path / "ids.npy")
    assert predicted.code == 0, predicted.err
    assert [row.split(",")[0] for row in predicted.out.splitlines()[1:]] == ["1", "0"]
