"""The error analysis at the end of `dlnc run`: the errors of every split next to the human
error, the gaps between them, and what to do about the largest.

The gaps, as the course notes name them:
- avoidable bias = train − human (human_error stands in for the Bayes error);
- variance = train-dev − train; without a train-dev split, dev − train (which then also holds
  any data mismatch when dev comes from another distribution);
- data mismatch = dev − train-dev (needs a train-dev split);
- overfitting to dev = test − dev.
The largest positive gap is named with the usual remedies for it. Errors are misclassification
rates for class and binary outputs, and mean squared errors for real outputs (human_error is
then read in the same unit). Pure functions over plain numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

GAPS = ("avoidable_bias", "variance", "data_mismatch", "overfitting_to_dev")
TITLES = {"avoidable_bias": "avoidable bias", "variance": "variance", "data_mismatch": "data mismatch",
          "overfitting_to_dev": "overfitting to dev"}
REMEDIES = {
    "avoidable_bias": ("train a bigger network (more units or more layers)",
                       "train longer, or with a better optimiser (adam, momentum, a tuned learning rate)",
                       "try another architecture, or less regularisation"),
    "variance": ("get more training data (or augment it)",
                 "regularise: l2 or l1, dropout, early stopping",
                 "try another architecture, or a smaller network"),
    "data_mismatch": ("make the training data more like the dev and test data: collect more of it, "
                      "or synthesise it (artificial data synthesis)",
                      "look at dev errors by hand to see how the two distributions differ",
                      "mix more examples of the dev distribution into training (dev_source does half)"),
    "overfitting_to_dev": ("get a bigger dev set: the choices tuned on dev fit it better than new data",
                           "tune less against dev, or refresh the dev set"),
}
SPLITS = ("human", "train", "train_dev", "dev", "test")
LABELS = {"human": "human (Bayes proxy)", "train": "train", "train_dev": "train-dev", "dev": "dev", "test": "test"}


@dataclass(frozen=True)
class Gap:
    name: str                       # one of GAPS
    value: float
    between: str                    # "train − human"


@dataclass(frozen=True)
class Analysis:
    unit: str                                       # "error" or "MSE"
    errors: Mapping[str, float | None]              # SPLITS → error, None where the split is absent
    gaps: tuple[Gap, ...]
    largest: Gap | None                             # the largest positive gap
    notes: tuple[str, ...] = field(default=())

    @property
    def remedies(self) -> tuple[str, ...]:
        return REMEDIES[self.largest.name] if self.largest is not None else ()


def analyse(errors: Mapping[str, float], human_error: float | None, *, real: bool = False,
            dev_distribution: str = "same", test_distribution: str = "same") -> Analysis:
    """The gaps between the errors of the splits present in `errors` (train, train_dev, dev, test)."""
    notes = []
    human = human_error
    if human is None:
        human = 0.0
        notes.append("human_error is not given, so it is taken as 0 (write `human_error E` in the data block "
                     "to set the Bayes-error proxy)")
    table = {"human": float(human), **{name: errors.get(name) for name in SPLITS[1:]}}
    train, train_dev, dev, test = (table[n] for n in SPLITS[1:])
    gaps = []
    if train is not None:
        gaps.append(Gap("avoidable_bias", train - human, "train − human"))
    if train is not None and train_dev is not None:
        gaps.append(Gap("variance", train_dev - train, "train-dev − train"))
    elif train is not None and dev is not None:
        gaps.append(Gap("variance", dev - train, "dev − train"))
        if dev_distribution == "other":
            notes.append("dev comes from another distribution, so dev − train mixes variance with data mismatch; "
                         "add `train_dev 0.05` to the data block to tell them apart")
    if train_dev is not None and dev is not None:
        gaps.append(Gap("data_mismatch", dev - train_dev, "dev − train-dev"))
    if dev is not None and test is not None:
        gaps.append(Gap("overfitting_to_dev", test - dev, "test − dev"))
        if test_distribution == "other" and dev_distribution == "same":
            notes.append("test comes from another distribution than dev, so test − dev also holds data mismatch")
    if dev is None:
        notes.append("there is no dev split: variance and data mismatch cannot be measured")
    positive = [g for g in gaps if g.value > 0]
    largest = max(positive, key=lambda g: g.value) if positive else None
    return Analysis("MSE" if real else "error", table, tuple(gaps), largest, tuple(notes))


def _show(value: float, unit: str) -> str:
    return f"{value:.4g}" if unit == "MSE" else f"{value:.2%}"


def _signed(value: float, unit: str) -> str:
    return ("+" if value >= 0 else "−") + _show(abs(value), unit)


def analysis_text(a: Analysis) -> str:
    """The table of errors and gaps, the largest gap and its remedies."""
    lines = [f"error analysis ({'mean squared error' if a.unit == 'MSE' else 'error rate'} per split):"]
    rows = [(LABELS[n], _show(v, a.unit)) for n, v in a.errors.items() if v is not None]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {label.ljust(width)}  {value.rjust(8)}" for label, value in rows]
    if a.gaps:
        lines.append("gaps:")
        gap_width = max(len(TITLES[g.name]) for g in a.gaps)
        between = max(len(g.between) for g in a.gaps)
        for g in a.gaps:
            mark = "  ← largest" if a.largest is not None and g.name == a.largest.name else ""
            lines.append(f"  {TITLES[g.name].ljust(gap_width)}  {g.between.ljust(between)}  "
                         f"{_signed(g.value, a.unit).rjust(9)}{mark}")
    if a.largest is not None:
        lines.append(f"largest gap: {TITLES[a.largest.name]} ({_signed(a.largest.value, a.unit)}). What usually helps:")
        lines += [f"  - {r}" for r in a.remedies]
    else:
        lines.append("no gap is positive: nothing stands out to fix")
    lines += [f"note: {n}" for n in a.notes]
    return "\n".join(lines)


def analysis_json(a: Analysis) -> dict:
    return {"unit": a.unit, "errors": dict(a.errors),
            "gaps": {g.name: {"value": g.value, "between": g.between} for g in a.gaps},
            "largest": a.largest.name if a.largest is not None else None,
            "remedies": list(a.remedies), "notes": list(a.notes)}
