"""Does a word-level language model prefer real sentences to shuffled ones?

    python examples/sentence_pairs.py [examples/devil_words.dln] [runs/devil_words/model.onnx]

For each held-out sentence (the test split of the program's data, the same lines `dlnc run` held
out), it scores the sentence and a shuffled copy of its words (a different order, drawn with a
fixed seed) with `dlnc score`'s log-probability, and prints the share of pairs where the true
sentence scores higher ("Ram ate an apple" above "Ram an ate apple").
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.language import load_language_model, rank_against_shuffled, held_out_lines  # noqa: E402


def main(program: str, model: str, count: int = 100) -> float:
    lines = held_out_lines(program)
    share, pairs = rank_against_shuffled(load_language_model(model), lines, count)
    print(f"{share:.1%} of {pairs} held-out sentences score above a shuffled copy of themselves")
    return share


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else str(ROOT / "examples" / "devil_words.dln"),
         args[1] if len(args) > 1 else "runs/devil_words/model.onnx")
