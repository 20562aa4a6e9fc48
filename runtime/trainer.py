"""The training loop: epochs of seeded mini-batches through the compiled training step.

Each epoch reshuffles the train split, runs one step per mini-batch, then evaluates every
split with the inference graph on the current weights (bound as OrtValues, not copied).
`early_stopping` watches dev_loss or dev_error and restores the best weights at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnxruntime as ort

from compiler.program import Compiled
from dsl import ast
from dsl.errors import DlnError

from .data import Dataset, Splits, batch_indices
from .metrics import LOSS_FUNCTIONS, error_rate
from .session import StepRunner, make_session

EVAL_CHUNK = 4096


@dataclass(frozen=True)
class SplitMetrics:
    loss: float
    error: float
    size: int


@dataclass(frozen=True)
class EpochRecord:
    epoch: int                      # from 1
    lr: float
    cost: float                     # mean J over the epoch's steps, regularisation included
    splits: Mapping[str, SplitMetrics]


@dataclass(frozen=True)
class TrainResult:
    weights: Mapping[str, np.ndarray]        # parameters and buffers, after any best-weight restore
    history: tuple[EpochRecord, ...]
    final: Mapping[str, SplitMetrics]
    best_epoch: int
    stopped_early: bool


def learning_rate(train: ast.Train, epoch: int) -> float:
    """α for an epoch (from 0), the same formula the training graph computes."""
    lr, decay = train.optimizer.lr, train.lr_decay
    if decay is None:
        return lr
    if decay.kind == "inverse":
        return lr / (1.0 + decay.rate * epoch)
    if decay.kind == "exponential":
        return lr * decay.rate ** epoch
    return lr * decay.factor ** math.floor(epoch / decay.every)


class Evaluator:
    """Runs the inference graph on the runner's current weights."""

    def __init__(self, compiled: Compiled, device: str = "cpu", threads: int | None = None):
        self.session = make_session(compiled.evaluation.SerializeToString(), device, threads)
        self.weight_names = [i.name for i in self.session.get_inputs() if i.name != compiled.spec.x]
        self.x_name = compiled.spec.x
        self.program = compiled.program
        self.loss = LOSS_FUNCTIONS[compiled.loss]

    def outputs(self, values: Mapping[str, ort.OrtValue], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's outputs and the last layer's logits for every example of x."""
        io = self.session.io_binding()
        for name in self.weight_names:
            io.bind_ortvalue_input(name, values[name])
        chunks = []
        for start in range(0, len(x), EVAL_CHUNK):
            io.bind_cpu_input(self.x_name, np.ascontiguousarray(x[start:start + EVAL_CHUNK]))
            for output in self.session.get_outputs():
                io.bind_output(output.name)
            self.session.run_with_iobinding(io)
            chunks.append(io.copy_outputs_to_cpu())
        return tuple(np.concatenate(parts) for parts in zip(*chunks))

    def metrics(self, values: Mapping[str, ort.OrtValue], data: Dataset) -> SplitMetrics:
        p, z = self.outputs(values, data.x)
        kind = self.program.output.kind
        return SplitMetrics(self.loss(p, z, data.y), error_rate(kind, p, data.y), len(data))


def named_splits(splits: Splits) -> dict[str, Dataset]:
    pairs = (("train", splits.train), ("train_dev", splits.train_dev), ("dev", splits.dev), ("test", splits.test))
    return {name: data for name, data in pairs if data is not None and len(data) > 0}


def _check_early_stopping(program: ast.Program, splits: Mapping[str, Dataset]) -> None:
    rule = program.train.early_stopping
    if rule is not None and "dev" not in splits:
        raise DlnError("early_stopping watches the dev split, but the data block gives no dev examples; "
                       "write `split train=0.8 dev=0.2` (or drop early_stopping)",
                       span=rule.span, path=program.path, source=program.source)


def train(compiled: Compiled, splits: Splits, *, device: str = "cpu", threads: int | None = None,
          on_step: Callable[[int, float], None] | None = None,
          on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    program, spec = compiled.program, compiled.spec
    data = named_splits(splits)
    _check_early_stopping(program, data)
    runner = StepRunner(compiled, device, threads)
    evaluator = Evaluator(compiled, device, threads)
    shuffle = np.random.default_rng([program.train.seed, 1])
    noise_rng = np.random.default_rng([program.train.seed, 2])
    x, y = splits.train.x, splits.train.y
    stopping = program.train.early_stopping
    best = (math.inf, 0, None)                  # (metric, epoch, weights)
    history: list[EpochRecord] = []
    weight_names = set(evaluator.weight_names)
    step = 0
    for epoch in range(program.train.epochs):
        runner.set_hyper({"epoch": float(epoch)})
        costs = []
        for idx in batch_indices(len(x), program.train.batch_size, shuffle):
            batch = {spec.x: x[idx], spec.y: y[idx]}
            for name, shape in spec.noise:
                batch[name] = noise_rng.random((len(idx), *shape[1:]), dtype=np.float32)
            cost = runner.step(batch)
            step += 1
            if not math.isfinite(cost):
                raise DlnError(f"training diverged: the cost became {cost} at epoch {epoch + 1}, step {step}; "
                               f"lower the learning rate (optimizer ... lr=) or add clip_norm",
                               span=program.train.optimizer.span, path=program.path, source=program.source)
            costs.append(cost)
            if on_step is not None:
                on_step(step, cost)
        values = runner.values()
        record = EpochRecord(epoch + 1, learning_rate(program.train, epoch), float(np.mean(costs)),
                             {name: evaluator.metrics(values, d) for name, d in data.items()})
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if stopping is not None:
            dev = record.splits["dev"]
            metric = dev.loss if stopping.metric == "dev_loss" else dev.error
            if metric < best[0]:
                best = (metric, epoch + 1, {n: v.numpy().copy() for n, v in values.items() if n in weight_names})
            elif epoch + 1 - best[1] >= stopping.patience:
                break
    stopped_early = stopping is not None and len(history) < program.train.epochs
    if stopping is not None and best[2] is not None:
        runner.load(best[2])
    values = runner.values()
    weights = {n: v.numpy().copy() for n, v in values.items() if n in weight_names}
    final = {name: evaluator.metrics(values, d) for name, d in data.items()}
    best_epoch = best[1] if stopping is not None else len(history)
    return TrainResult(weights, tuple(history), final, best_epoch, stopped_early)
