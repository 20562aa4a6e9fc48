"""Language models: sample text, score sentences, and perplexities against a unigram baseline.

A dlnc language model is an exported model with a `tokens` input x (N, T) of int64 ids, any T, and
a `tokens per_step` output (N, T, V): at step t, P(next token | x_1 … x_t). Its metadata holds the
vocabulary (`dlnc.vocab`, JSON; an id is a position in it, <EOS> is 0 and <UNK> 1 for text data) and
the text level (`dlnc.text_level`: char, word, or empty for token ids written as numbers).

<EOS> ends every example and starts the next (runtime/text.py), so the model reads <EOS> first:
- score: for a sentence of tokens y_1 … y_n, with y_{n+1} = <EOS>, the model reads <EOS> y_1 … y_n
  and  log P(sentence) = Σ_{t=1}^{n+1} log P(y_t | y_1 … y_{t−1})  (natural log), the probability
  of the whole example, its end included. A token outside the vocabulary is scored as <UNK>.
- sample: from <EOS> and the start text's tokens, draw the next token from P^(1/τ) renormalised
  (τ the temperature), append it, and go on until <EOS> or `length` new tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from dsl.errors import DlnError

from .files import load_onnx
from .text import EOS, UNK, detokenize, tokenize

TINY = 1e-300


@dataclass(frozen=True)
class LanguageModel:
    session: object                 # onnxruntime.InferenceSession
    input_name: str
    vocab: tuple[str, ...]
    level: str                      # char | word | "" (ids as numbers)
    path: str

    def tokens(self, text: str) -> list[str]:
        return tokenize(text, self.level) if self.level else text.split()

    def ids(self, tokens: Sequence[str]) -> np.ndarray:
        index = {t: i for i, t in enumerate(self.vocab)}
        unknown = index.get(UNK)
        out = []
        for token in tokens:
            if token not in index and unknown is None:
                raise DlnError(f"'{token}' is not in the model's vocabulary (ids 0 … {len(self.vocab) - 1})",
                               path=self.path)
            out.append(index.get(token, unknown))
        return np.asarray(out, dtype=np.int64)

    def text(self, tokens: Sequence[str]) -> str:
        return detokenize(tokens, self.level) if self.level else " ".join(tokens)

    def next_probabilities(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), V): row t is P(next | ids[0] … ids[t]), float64."""
        return np.asarray(self.session.run(None, {self.input_name: ids[None, :]})[0][0], dtype=np.float64)


def load_language_model(path: str | Path) -> LanguageModel:
    import onnxruntime as ort
    model = load_onnx(path)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("dlnc.output_kind") != "tokens" or "dlnc.vocab" not in meta:
        raise DlnError("not a dlnc language model: sampling and scoring need a model trained with "
                       "`input x: tokens` and `output y: tokens per_step` (its vocabulary is in the metadata)",
                       path=str(path))
    vocab = tuple(json.loads(meta["dlnc.vocab"]))
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.INT64:
        raise DlnError("not a dlnc language model: it takes more than token ids (a training step? sample and score "
                       "read the model.onnx of a run)", path=str(path))
    input_name = inputs[0].name
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return LanguageModel(session, input_name, vocab, meta.get("dlnc.text_level", ""), str(path))


def _eos(model: LanguageModel) -> int:
    if EOS not in model.vocab:
        raise DlnError("the model's vocabulary has no <EOS>: sampling and scoring need one (text data gives it)",
                       path=model.path)
    return model.vocab.index(EOS)


# ---------------------------------------------------------------- score
@dataclass(frozen=True)
class Score:
    tokens: tuple[str, ...]          # as scored: the sentence's tokens (unknown ones as <UNK>), then <EOS>
    written: tuple[str, ...]         # as written, then <EOS>
    probabilities: tuple[float, ...]  # P(y_t | y_1 … y_{t−1})
    log_probability: float           # Σ_t log P(y_t | y_1 … y_{t−1})


def score(model: LanguageModel, sentence: str) -> Score:
    return score_tokens(model, model.tokens(sentence))


def score_tokens(model: LanguageModel, written: Sequence[str]) -> Score:
    eos = _eos(model)
    ids = model.ids(written)
    targets = np.append(ids, eos)
    probs = model.next_probabilities(np.insert(ids, 0, eos))
    picked = probs[np.arange(len(targets)), targets]
    return Score(tuple(model.vocab[i] for i in targets), tuple(written) + (EOS,), tuple(float(p) for p in picked),
                 float(np.sum(np.log(np.maximum(picked, TINY)))))


def score_text(model: LanguageModel, sentence: str) -> str:
    result = score(model, sentence)
    n = len(result.tokens)
    header = (f'log P("{sentence}") = {result.log_probability:.4f}  (natural log, the sum over its {n} tokens '
              f'with <EOS>; P = {math.exp(result.log_probability):.4g}, perplexity '
              f"{math.exp(-result.log_probability / n):.2f})")
    shown = [w if w == t else f"{w} → {t}" for w, t in zip(result.written, result.tokens)]
    width = max(len("token"), *(len(s) for s in shown))
    rows = [f"  {'token'.ljust(width)}  P(token | before)   log P"]
    rows += [f"  {s.ljust(width)}  {p:<18.6g}  {math.log(max(p, TINY)):.4f}" for s, p in zip(shown, result.probabilities)]
    return "\n".join([header, *rows])


# ---------------------------------------------------------------- sample
def sample(model: LanguageModel, start: str = "", length: int = 40, temperature: float = 1.0,
           seed: int | None = None) -> str:
    """The start text and up to `length` tokens drawn after it (stopping at <EOS>)."""
    if length < 1:
        raise DlnError(f"--length must be at least 1, not {length}", path="dlnc sample")
    if not temperature > 0:
        raise DlnError(f"--temperature must be above 0, not {temperature}", path="dlnc sample")
    eos = _eos(model)
    rng = np.random.default_rng(seed)
    start_tokens = model.tokens(start)
    ids = np.insert(model.ids(start_tokens), 0, eos)
    drawn: list[str] = []
    for _ in range(length):
        logp = np.log(np.maximum(model.next_probabilities(ids)[-1], TINY)) / temperature
        p = np.exp(logp - logp.max())
        token = int(rng.choice(len(p), p=p / p.sum()))
        if token == eos:
            break
        drawn.append(model.vocab[token])
        ids = np.append(ids, token)
    if model.level == "char":
        return start + "".join(drawn)
    return model.text(start_tokens + drawn)


# ---------------------------------------------------------------- perplexities after `dlnc run`
def unigram_perplexity(train_targets: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """exp of the mean −log p(y) with p the train split's token frequencies, add-one smoothed."""
    counts = np.bincount(train_targets.ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(np.exp(-np.mean(np.log(p[targets.ravel()]))))


def perplexities(split_losses: Mapping[str, float], splits, level: str) -> dict:
    """Per-token perplexity exp(loss / T) of each split (loss: summed over the T steps of a window,
    averaged over the windows), and the unigram baseline on the dev split (else test, else train)."""
    steps = int(splits.train.x.shape[1])
    unit = {"char": "character", "word": "word"}.get(level, "token")
    out = {"per": unit, "model": {name: float(np.exp(loss / steps)) for name, loss in split_losses.items()}}
    name, data = next((n, d) for n, d in (("dev", splits.dev), ("test", splits.test), ("train", splits.train))
                      if d is not None)
    out["baseline_split"] = name
    out["unigram"] = unigram_perplexity(splits.train.y, data.y, len(splits.vocab))
    return out


def perplexity_text(result: Mapping) -> str:
    name, unit = result["baseline_split"], result["per"]
    model = result["model"].get(name)
    lines = [f"perplexity per {unit} on {name}: model {model:.2f}, unigram baseline {result['unigram']:.2f}"
             if model is not None else f"unigram baseline perplexity per {unit} on {name}: {result['unigram']:.2f}"]
    others = ", ".join(f"{n} {v:.2f}" for n, v in result["model"].items() if n != name)
    if others:
        lines.append(f"  (model, other splits: {others})")
    return "\n".join(lines)


def with_perplexities(summary: dict, text: str, program, splits) -> tuple[dict, str]:
    """`dlnc run`'s summary and text, with the perplexities of a language model added."""
    level = program.data.source.level if program.data is not None and program.data.source.kind == "text" else ""
    losses = {name: m["loss"] for name, m in summary.get("splits", {}).items()}
    result = perplexities(losses, splits, level or "")
    return summary | {"perplexity": result}, text + "\n" + perplexity_text(result)


# ---------------------------------------------------------------- true sentences against shuffled ones
def held_out_lines(program_path: str | Path, split: str = "test") -> list[str]:
    """The lines of a text program's data that `dlnc run` put in `split` (the same seeded cut)."""
    import dsl
    from .text import read_examples, split_lines
    program = dsl.load_file(str(program_path))
    data = program.data
    lines, _, _, _ = read_examples(data.source, Path(program_path).parent, str(program_path))
    parts, _ = split_lines(len(lines), data, program.train.seed)
    return [lines[i] for i in parts[{"train": 0, "dev": 1, "test": 2}[split]]]


def shuffled_words(tokens: Sequence[str], rng: np.random.Generator) -> list[str] | None:
    """The tokens with their words in another order, punctuation left in place (None: no other order)."""
    places = [i for i, t in enumerate(tokens) if any(c.isalnum() for c in t)]
    words = [tokens[i] for i in places]
    if len(set(words)) < 2:
        return None
    while True:
        order = rng.permutation(len(words))
        if any(words[j] != w for j, w in zip(order, words)):
            out = list(tokens)
            for place, j in zip(places, order):
                out[place] = words[j]
            return out


def rank_against_shuffled(model: LanguageModel, lines: Sequence[str], count: int = 100,
                          seed: int = 0) -> tuple[float, int]:
    """(share of sentences scoring above a shuffled copy, pairs compared), over the first `count`
    lines that have two different words; a tie counts against the model."""
    rng = np.random.default_rng(seed)
    wins = pairs = 0
    for line in lines:
        tokens = model.tokens(line)
        other = shuffled_words(tokens, rng)
        if other is None:
            continue
        wins += score_tokens(model, tokens).log_probability > score_tokens(model, other).log_probability
        pairs += 1
        if pairs == count:
            break
    return (wins / pairs if pairs else 0.0), pairs
