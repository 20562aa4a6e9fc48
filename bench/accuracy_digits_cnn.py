"""The accuracy study of issue 3: is 97 % test accuracy a property of examples/digits_cnn.dln itself?

    python bench/accuracy_digits_cnn.py              # 10 seeds, 25 epochs (about a minute on 2 cores)
    python bench/accuracy_digits_cnn.py --seeds 20 --json study.json
    python bench/accuracy_digits_cnn.py --quick      # a smoke test: 2 seeds, 2 epochs (CI); nothing is asserted

Issue 3 asks that the reference program reach >= 97 % test accuracy. For every seed s the study
adds `seed s` to the program's train block and then, for that one program:

  dlnc     loads it with dlnc's front end, loads its data splits (drawn from the seed) and compiles
           it exactly as `dlnc run` does, then trains it with runtime.trainer.train;
  torch32  trains the same network in PyTorch (tests/torch_reference.py's TorchNet) from the same
           initial parameters (the compiler's He/Xavier draws), with the same mini-batches: each
           epoch's permutation and augmented images are drawn from runtime.trainer.generators(s)
           exactly as the trainer draws them, so both see identical batches. The momentum step is
           the course's EWMA v ← βv + (1−β)dW, W ← W − αv, i.e. torch SGD(lr=α(1−β), momentum=β);
  torch64  the same in float64: the exact computation, free of float32 rounding of its own;

and, in torch float32 only, from the same initial parameters and the same shuffles, three variants
that locate the ceiling:

  no-aug     the same program without `augment translate=1`;
  x/16 α×10  pixels scaled to 0..1 and torch's own momentum step SGD(lr=α, momentum=β), which is
             the EWMA form with α×10 (the step torch users write for this network);
  adam .01   the raw pixels and augmentation, Adam lr=0.01 (β₁=0.9, β₂=0.999, ε=1e-8).

It reports the train/dev/test accuracy of the final weights (the program has no early stopping),
one table row per seed with the test accuracies, the mean, median, min and max of every column,
and how many seeds reach 97 %. dlnc, torch32 and torch64 take the same steps to about 1e-6 per
step (tests/test_parity_conv.py), but not for ever: now and then a ReLU pre-activation lies within
float32 rounding of 0 (e.g. −1.2e-5 exactly, +5.5e-6 in float32, among values up to 120), its gate
flips in one run and not the other, and from that step the trajectories part (final parameters a
few percent apart, ΔW). The test accuracies still agree to an example or two of 180; the largest
disagreements are printed, never hidden.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))          # tests/torch_reference.py

import torch
from torch_reference import TorchNet, relative, torch_optimizer

import dsl
from compiler.program import Compiled
from runtime.augment import augment_images
from runtime.cli import compile_with_data, load_data
from runtime.data import Splits, batch_indices
from runtime.trainer import generators, train

PROGRAM = ROOT / "examples" / "digits_cnn.dln"
TARGET = 97.0                       # issue 3: test accuracy in percent
SPLITS = ("train", "dev", "test")
PIXEL_MAX = 16.0                    # sklearn's load_digits: whole pixel values 0..16


# ---------------------------------------------------------------- the program
def program_text(source: str, seed: int, epochs: int | None = None) -> str:
    """The reference program with `seed <seed>` appended to its train block (and, for --quick,
    its epochs replaced)."""
    block = re.search(r"\btrain\s*\{[^{}]*\}", source)
    if block is None or re.search(r"\bseed\b", block.group()):
        raise ValueError("expected a train block without a seed")
    body = block.group()[:-1].rstrip().rstrip(";")
    if epochs is not None:
        body, count = re.subn(r"\bepochs\s+\d+", f"epochs {epochs}", body)
        assert count == 1, "the train block names no epochs"
    return source[:block.start()] + f"{body}; seed {seed} }}" + source[block.end():]


def load_program(text: str) -> tuple[Compiled, Splits]:
    """Parse, load the data and compile as `dlnc run` does (runtime/cli.py cmd_run)."""
    program = dsl.load(text, str(PROGRAM))      # the file's path: data paths resolve beside it, as in a run
    splits = load_data(program)
    compiled = compile_with_data(program, splits)
    assert not compiled.spec.noise, "dropout noise is not reproduced on the torch side"
    assert not program.data.normalize, "input normalisation is not reproduced on the torch side"
    assert program.train.lr_decay is None and program.train.early_stopping is None
    assert program.train.regularize is None
    return compiled, splits


# ---------------------------------------------------------------- the mini-batches
@dataclass(frozen=True)
class Epoch:
    augmented: np.ndarray             # the train split's images as the epoch's augmentation drew them
    batches: list[np.ndarray]         # the epoch's permutation cut into mini-batches (indices)


def epoch_schedule(compiled: Compiled, x: np.ndarray) -> list[Epoch]:
    """Every epoch's images and batches, drawn from the run's random streams in the trainer's
    order (runtime/trainer.py train): augment_images(x, augment, rngs["augment"]), then
    batch_indices(n, batch_size, rngs["shuffle"]); the two streams are independent."""
    program = compiled.program
    rngs = generators(program.train.seed)
    augment = program.data.augment
    schedule = []
    for _ in range(program.train.epochs):
        augmented = x if augment is None else augment_images(x, augment, rngs["augment"])
        schedule.append(Epoch(augmented, batch_indices(len(x), program.train.batch_size, rngs["shuffle"])))
    return schedule


# ---------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Accuracy:
    """Percent of correctly classified examples per split, of the final weights."""
    train: float
    dev: float
    test: float


def percent_correct(probabilities: np.ndarray, y: np.ndarray) -> float:
    """100 · mean(argmax_k p_k = y), as runtime/metrics.py error_rate counts a class output."""
    return 100.0 * float(np.mean(np.argmax(probabilities, axis=1) == y.astype(np.int64)))


def run_dlnc(compiled: Compiled, splits: Splits, threads: int | None) -> tuple[Accuracy, dict[str, np.ndarray]]:
    """`dlnc run`'s training loop; accuracy = 1 − its error rate on each split."""
    result = train(compiled, splits, threads=threads)
    return Accuracy(*(100.0 * (1.0 - result.final[name].error) for name in SPLITS)), dict(result.weights)


@dataclass(frozen=True)
class Variant:
    """A torch run: what the network sees and how it steps."""
    name: str
    title: str
    augment: bool                      # the augmented images of the schedule, or the plain train split
    scale: float                       # x ↦ x / scale, for training and evaluation alike
    optimizer: Callable[[object, list], torch.optim.Optimizer]   # (ast.Optimizer, params) → optimiser
    dtype: torch.dtype = torch.float32


def program_optimizer(opt, params) -> torch.optim.Optimizer:
    return torch_optimizer(opt, params)[0]


def torch_momentum(opt, params) -> torch.optim.Optimizer:
    # torch: b ← βb + dW, W ← W − α b  =  the EWMA form with α/(1−β) = 10α for β = 0.9
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.beta)


def adam(opt, params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8)


VARIANTS = (
    Variant("torch", "torch32", True, 1.0, program_optimizer),
    Variant("torch64", "torch64", True, 1.0, program_optimizer, torch.float64),
    Variant("no_aug", "no-aug", False, 1.0, program_optimizer),
    Variant("scaled", "x/16 α×10", True, PIXEL_MAX, torch_momentum),
    Variant("adam", "adam .01", True, 1.0, adam),
)
REFERENCES = ("torch", "torch64")          # the program itself, in torch float32 and float64


def scaled(x: np.ndarray, scale: float) -> np.ndarray:
    """x / scale in float32 (exact for 1 and 16: powers of two)."""
    return np.ascontiguousarray(x / np.float32(scale))


def run_torch(compiled: Compiled, splits: Splits, schedule: Sequence[Epoch],
              variant: Variant) -> tuple[Accuracy, dict[str, np.ndarray]]:
    """Mini-batch training in torch (float32, or float64 for the exact computation): per batch
    J = (1/m) Σ_i −log softmax(z_i)[y_i] (TorchNet.cost with λ = 0), J.backward(), one optimiser step."""
    net = TorchNet(compiled, variant.dtype)
    optimizer = variant.optimizer(compiled.program.train.optimizer, list(net.params.values()))
    x, y = splits.train.x, splits.train.y
    for epoch in schedule:
        images = epoch.augmented if variant.augment else x
        for idx in epoch.batches:
            optimizer.zero_grad()
            net.cost(scaled(images[idx], variant.scale), y[idx], 0.0).backward()
            optimizer.step()
    data = {"train": splits.train, "dev": splits.dev, "test": splits.test}
    accuracy = Accuracy(*(percent_correct(net.probabilities(scaled(data[name].x, variant.scale)), data[name].y)
                          for name in SPLITS))
    return accuracy, net.arrays()


@dataclass(frozen=True)
class SeedResult:
    seed: int
    test_size: int
    dlnc: Accuracy
    runs: Mapping[str, Accuracy]                # variant name → accuracy
    weight_differences: Mapping[str, float]     # reference → max over tensors of max|W_dlnc − W| / max|W|
    seconds: float


def study_seed(source: str, seed: int, epochs: int | None, threads: int | None) -> SeedResult:
    start = time.perf_counter()
    compiled, splits = load_program(program_text(source, seed, epochs))
    schedule = epoch_schedule(compiled, splits.train.x)
    dlnc, dlnc_weights = run_dlnc(compiled, splits, threads)
    runs, differences = {}, {}
    for variant in VARIANTS:
        runs[variant.name], weights = run_torch(compiled, splits, schedule, variant)
        if variant.name in REFERENCES:
            differences[variant.name] = max(relative(dlnc_weights[n], w) for n, w in weights.items())
    return SeedResult(seed, len(splits.test), dlnc, runs, differences, time.perf_counter() - start)


# ---------------------------------------------------------------- the table
COLUMNS = (("dlnc train", lambda r: r.dlnc.train), ("dlnc dev", lambda r: r.dlnc.dev),
           ("dlnc test", lambda r: r.dlnc.test),
           *((v.title, (lambda r, n=v.name: r.runs[n].test)) for v in VARIANTS))


def examples_apart(result: SeedResult, reference: str) -> int:
    """|dlnc − reference| test accuracy in examples: |Δ%| · n / 100."""
    return round(abs(result.dlnc.test - result.runs[reference].test) * result.test_size / 100.0)


def summary_rows(results: Sequence[SeedResult]) -> list[tuple[str, list[str]]]:
    columns = [[get(r) for r in results] for _, get in COLUMNS]
    rows = [(name, [f"{fn(c):.1f}" for c in columns])
            for name, fn in (("mean", statistics.fmean), ("median", statistics.median), ("min", min), ("max", max))]
    rows.append((f">={TARGET:g}%", [f"{sum(v >= TARGET - 1e-9 for v in c)}/{len(c)}" for c in columns]))
    return rows


def table(results: Sequence[SeedResult]) -> str:
    """One row per seed: accuracies in percent; Δ32, Δ64 = |dlnc − torch| test accuracy in examples
    against torch float32 and float64; ΔW32, ΔW64 = the largest relative difference of the final
    parameters; s = the seed's seconds. Then the summary rows and the largest disagreements."""
    heads = [name for name, _ in COLUMNS]
    widths = [max(len(h), 6) for h in heads]

    def line(first: str, cells: Sequence[str], tail: str = "") -> str:
        return f"{first:>7s}  " + "  ".join(f"{c:>{w}s}" for c, w in zip(cells, widths)) + tail

    out = [line("seed", heads, "   Δ32  Δ64     ΔW32     ΔW64     s")]
    for r in results:
        apart = "".join(f"  {examples_apart(r, ref):4d}" for ref in REFERENCES)
        moved = "".join(f"  {r.weight_differences[ref]:7.1e}" for ref in REFERENCES)
        out.append(line(str(r.seed), [f"{get(r):.1f}" for _, get in COLUMNS], f" {apart} {moved}  {r.seconds:4.1f}"))
    out.append("-" * len(out[0]))
    out += [line(name, cells) for name, cells in summary_rows(results)]
    for ref, title in zip(REFERENCES, ("torch float32", "torch float64")):
        worst = max(results, key=lambda r: examples_apart(r, ref))
        out.append(f"largest |dlnc − {title}| test accuracy: "
                   f"{abs(worst.dlnc.test - worst.runs[ref].test):.2f} points = {examples_apart(worst, ref)} of "
                   f"{worst.test_size} examples (seed {worst.seed}); largest relative parameter difference "
                   f"{max(r.weight_differences[ref] for r in results):.1e}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 seeds, 2 epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime and torch intra-op threads (default 1: these steps are too small to share)")
    parser.add_argument("--json", help="also write every run's train/dev/test accuracy to this JSON file")
    args = parser.parse_args(argv)
    seeds, epochs = (2, 2) if args.quick else (args.seeds, None)
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    torch.set_num_threads(args.threads)
    source = PROGRAM.read_text(encoding="utf-8")
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    start = time.perf_counter()
    results = []
    for seed in range(seeds):
        results.append(study_seed(source, seed, epochs, args.threads))
        r = results[-1]
        log(f"seed {seed}: dlnc {r.dlnc.test:.1f}  torch32 {r.runs['torch'].test:.1f}  "
            f"torch64 {r.runs['torch64'].test:.1f}  ({r.seconds:.1f} s)")
    elapsed = time.perf_counter() - start
    print(f"{PROGRAM.relative_to(ROOT)}: test accuracy (%) of the final weights, {seeds} seeds, "
          f"{epochs or 'the program’s'} epochs; {results[0].test_size} test examples per seed")
    print(table(results))
    print(f"{elapsed:.0f} s on {args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"target": TARGET, "epochs": epochs, "seconds": elapsed,
             "seeds": [{"seed": r.seed, "test_size": r.test_size, "dlnc": asdict(r.dlnc),
                        **{n: asdict(a) for n, a in r.runs.items()},
                        "weight_differences": dict(r.weight_differences), "seconds": r.seconds} for r in results]},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
