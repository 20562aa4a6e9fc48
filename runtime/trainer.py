"""The training loop: epochs of seeded mini-batches through the compiled training step.

Each epoch reshuffles the train split, runs one step per mini-batch, then evaluates every
split with the inference graph on the current weights (bound as OrtValues, not copied).
`early_stopping` watches dev_loss or dev_error and restores the best weights at the end.

At the end of every epoch the loop hands a `Snapshot` to `on_checkpoint`: everything that
decides the rest of the run (every array of the step runner, the states of every random
stream in `generators`, the step count, the early-stopping state and best weights, the history). A run
started from a snapshot (`resume=`) goes on exactly as the uninterrupted run would have, to
the bit: the same batches, the same noise, the same arithmetic.

Non-finite values stop the run: a NaN or Inf cost raises `NonFiniteError` naming the epoch,
the step and the batch, before the epoch's snapshot is taken, so the last good checkpoint
stays the newest. `check_numerics=True` also checks, after every step, that every updated
parameter and optimiser slot is finite, which catches a non-finite gradient at the step
that produced it (the update is computed from it) even while the cost is still finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnxruntime as ort

from compiler.program import FLAT, Compiled
from dsl import ast
from dsl.errors import DlnError

from .augment import augment_images
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
    changes: Mapping[str, float] = field(default_factory=dict)   # graph inputs changed before this epoch (tune)


@dataclass(frozen=True)
class TrainResult:
    weights: Mapping[str, np.ndarray]        # parameters and buffers, after any best-weight restore
    history: tuple[EpochRecord, ...]
    final: Mapping[str, SplitMetrics]
    best_epoch: int
    stopped_early: bool
    steps: int = 0
    resumed_from: int = 0                    # the epoch of the snapshot the run started from (0: none)


@dataclass(frozen=True)
class Snapshot:
    """The state of a run at the end of an epoch: enough to go on exactly as before."""

    epoch: int                               # epochs done
    step: int                                # training steps done
    arrays: Mapping[str, np.ndarray]         # every value of the step runner (StepRunner.arrays())
    rng_states: Mapping[str, Mapping[str, Any]]   # name → np.random.Generator.bit_generator.state
    history: tuple[EpochRecord, ...]
    best_metric: float = math.inf            # early stopping: the best dev metric so far
    best_epoch: int = 0
    best_arrays: Mapping[str, np.ndarray] | None = None
    stopped: bool = False                    # early stopping has ended the run

    def meta(self) -> dict:
        """The JSON-able part (the arrays go to the .npz)."""
        return {"epoch": self.epoch, "step": self.step,
                "rng": {name: dict(state) for name, state in self.rng_states.items()},
                "early_stopping": {"best_metric": self.best_metric, "best_epoch": self.best_epoch,
                                   "has_best_weights": self.best_arrays is not None, "stopped": self.stopped},
                "history": [record_json(r) for r in self.history]}

    @staticmethod
    def from_saved(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], best_prefix: str = "best/") -> "Snapshot":
        stopping = meta.get("early_stopping", {})
        best = {n[len(best_prefix):]: a for n, a in arrays.items() if n.startswith(best_prefix)}
        return Snapshot(int(meta["epoch"]), int(meta["step"]),
                        {n: a for n, a in arrays.items() if not n.startswith(best_prefix)},
                        dict(meta["rng"]),
                        tuple(record_from_json(r) for r in meta.get("history", [])),
                        float(stopping.get("best_metric", math.inf)), int(stopping.get("best_epoch", 0)),
                        best if stopping.get("has_best_weights") else None, bool(stopping.get("stopped", False)))


class NonFiniteError(DlnError):
    """Training met a NaN or Inf; says where (epoch, step, batch)."""

    def __init__(self, message: str, *, epoch: int, step: int, batch: int, **where):
        super().__init__(message, **where)
        self.epoch, self.step, self.batch = epoch, step, batch


def record_json(record: EpochRecord) -> dict:
    return {"epoch": record.epoch, "lr": record.lr, "cost": record.cost,
            "splits": {name: [m.loss, m.error, m.size] for name, m in record.splits.items()},
            **({"changes": dict(record.changes)} if record.changes else {})}


def record_from_json(data: Mapping[str, Any]) -> EpochRecord:
    return EpochRecord(int(data["epoch"]), float(data["lr"]), float(data["cost"]),
                       {name: SplitMetrics(float(v[0]), float(v[1]), int(v[2])) for name, v in data["splits"].items()},
                       {name: float(v) for name, v in data.get("changes", {}).items()})


def learning_rate(train: ast.Train, epoch: int, hyper: Mapping[str, float] | None = None) -> float:
    """α for an epoch (from 0), the same formula the training graph computes; `hyper` holds the
    graph inputs' current values where they differ from the program's (lr, decay_rate, ...)."""
    hyper = hyper or {}
    lr, decay = hyper.get("lr", train.optimizer.lr), train.lr_decay
    if decay is None:
        return lr
    rate = hyper.get("decay_rate", decay.rate)
    if decay.kind == "inverse":
        return lr / (1.0 + rate * epoch)
    if decay.kind == "exponential":
        return lr * rate ** epoch
    return lr * hyper.get("decay_factor", decay.factor) ** math.floor(epoch / hyper.get("decay_every", decay.every))


class Evaluator:
    """Runs the inference graph on the runner's current weights."""

    def __init__(self, compiled: Compiled, device: str = "cpu", threads: int | None = None,
                 session: ort.InferenceSession | None = None):
        self.session = session or make_session(compiled.evaluation.SerializeToString(), device, threads)
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


def check_early_stopping(program: ast.Program, splits: Mapping[str, Dataset]) -> None:
    rule = program.train.early_stopping
    if rule is not None and "dev" not in splits:
        raise DlnError("early_stopping watches the dev split, but the data block gives no dev examples; "
                       "write `split train=0.8 dev=0.2` (or drop early_stopping)",
                       span=rule.span, path=program.path, source=program.source)


def check_augment(program: ast.Program) -> None:
    """augment transforms images: the input must be declared float[C, H, W]."""
    augment = program.data.augment if program.data is not None else None
    if augment is not None and len(program.input.shape) != 3:
        raise DlnError(f"augment transforms images, but input {program.input.name} is "
                       f"float[{', '.join(map(str, program.input.shape))}]; declare it as float[C, H, W] "
                       f"(the built-in digits are float[1, 8, 8]) or drop augment",
                       span=augment.span, path=program.path, source=program.source)


def _non_finite(program: ast.Program, what: str, epoch: int, step: int, batch: int, batches: int) -> NonFiniteError:
    return NonFiniteError(
        f"training stopped: {what} at epoch {epoch}, step {step} (batch {batch} of {batches} of that epoch); "
        "lower the learning rate (optimizer ... lr=), add clip_norm, or normalize the inputs",
        epoch=epoch, step=step, batch=batch,
        span=program.train.optimizer.span, path=program.path, source=program.source)


def _first_non_finite(runner: StepRunner) -> tuple[str, str] | None:
    """(name, "NaN" or "Inf") of the first updated value that is not finite (a trainable
    parameter by its own name, not as part of the flat vector of all of them)."""
    values = runner.values()
    for name in [*runner.views, *(n for n in runner.updated if n != FLAT and n in values)]:
        array = values[name].numpy()
        if not np.isfinite(array).all():
            return name, "NaN" if np.isnan(array).any() else "Inf"
    return None


def generators(seed: int) -> dict[str, np.random.Generator]:
    """Every random stream of a run, each seeded from the program's seed. A checkpoint saves
    all their states, so a resumed run draws exactly what the uninterrupted one would have:
    shuffle (the epoch's permutation), noise (dropout's U(0, 1) inputs), augment (image
    augmentation draws)."""
    return {"shuffle": np.random.default_rng([seed, 1]), "noise": np.random.default_rng([seed, 2]),
            "augment": np.random.default_rng([seed, 3])}


def train(compiled: Compiled, splits: Splits, *, device: str = "cpu", threads: int | None = None,
          on_step: Callable[[int, float], None] | None = None,
          on_epoch: Callable[[EpochRecord], None] | None = None,
          on_checkpoint: Callable[[Snapshot], None] | None = None,
          resume: Snapshot | None = None, check_numerics: bool = False,
          on_start: Callable[[], None] | None = None,
          sessions: tuple[ort.InferenceSession, ort.InferenceSession] | None = None,
          control: Callable[[int, Mapping[str, float]], Mapping[str, float]] | None = None) -> TrainResult:
    """Train from the initial weights, or from `resume`; see the module docstring.
    `on_start` runs once the sessions exist, before the first step. `sessions`: existing
    (training step, evaluation) sessions of these graphs, reused (a search's trials that differ
    only in graph inputs). `control(epoch, current)` runs before each epoch (from 0) with the
    current values of the graph inputs and returns those to change now (babysitting, `dlnc
    tune`); the changes are recorded in the epoch's record, and a resumed run replays them."""
    program, spec = compiled.program, compiled.spec
    data = named_splits(splits)
    check_early_stopping(program, data)
    check_augment(program)
    augment = program.data.augment if program.data is not None else None
    train_session, eval_session = sessions or (None, None)
    runner = StepRunner(compiled, device, threads, session=train_session)
    evaluator = Evaluator(compiled, device, threads, session=eval_session)
    hyper = {name: float(v) for name, v in spec.hyper.items() if name != "epoch"}   # as the graph gets them
    rngs = generators(program.train.seed)
    shuffle, noise_rng = rngs["shuffle"], rngs["noise"]
    x, y = splits.train.x, splits.train.y
    stopping = program.train.early_stopping
    weight_names = set(evaluator.weight_names)
    best_metric, best_epoch, best_weights = math.inf, 0, None
    history: list[EpochRecord] = []
    step, start, stopped = 0, 0, False
    if resume is not None:
        runner.load(resume.arrays)
        for name, state in resume.rng_states.items():
            if name in rngs:
                rngs[name].bit_generator.state = dict(state)
        history = list(resume.history)
        step, start, stopped = resume.step, resume.epoch, resume.stopped
        best_metric, best_epoch = resume.best_metric, resume.best_epoch
        best_weights = dict(resume.best_arrays) if resume.best_arrays is not None else None
        for record in history:                       # the changes made while it ran hold on
            hyper.update(record.changes)
        runner.set_hyper(hyper)
    if on_start is not None:
        on_start()
    for epoch in range(start, program.train.epochs):
        if stopped:
            break
        runner.set_hyper({"epoch": float(epoch)})
        changes = {}
        if control is not None:
            changes = {name: float(v) for name, v in control(epoch, dict(hyper)).items()
                       if name in hyper and float(v) != hyper[name]}
            hyper.update(changes)
            runner.set_hyper(changes)
        costs = []
        x_epoch = x if augment is None else augment_images(x, augment, rngs["augment"])
        batches = batch_indices(len(x), program.train.batch_size, shuffle)
        feed = runner.epoch_batches({spec.x: x_epoch, spec.y: y}, batches)   # one gather per epoch
        for number, (idx, batch) in enumerate(zip(batches, feed), start=1):
            for name, shape in spec.noise:
                batch[name] = noise_rng.random((len(idx), *shape[1:]), dtype=np.float32)
            cost = runner.step(batch)
            step += 1
            if not math.isfinite(cost):
                raise _non_finite(program, f"the cost became {cost}", epoch + 1, step, number, len(batches))
            if check_numerics:
                bad = _first_non_finite(runner)
                if bad is not None:
                    name, kind = bad
                    what = (f"the new value of '{name}' is {kind} (its gradient or its update overflowed)"
                            if name in spec.trainable else f"'{name}' became {kind}")
                    raise _non_finite(program, what, epoch + 1, step, number, len(batches))
            costs.append(cost)
            if on_step is not None:
                on_step(step, cost)
        values = runner.values()
        record = EpochRecord(epoch + 1, learning_rate(program.train, epoch, hyper), float(np.mean(costs)),
                             {name: evaluator.metrics(values, d) for name, d in data.items()}, changes)
        history.append(record)
        if stopping is not None:
            dev = record.splits["dev"]
            metric = dev.loss if stopping.metric == "dev_loss" else dev.error
            if metric < best_metric:
                best_metric, best_epoch = metric, epoch + 1
                best_weights = {n: v.numpy().copy() for n, v in values.items() if n in weight_names}
            elif epoch + 1 - best_epoch >= stopping.patience:
                stopped = True
        if on_checkpoint is not None:
            on_checkpoint(Snapshot(epoch + 1, step, runner.arrays(),
                                   {name: dict(g.bit_generator.state) for name, g in rngs.items()}, tuple(history),
                                   best_metric, best_epoch, best_weights, stopped))
        if on_epoch is not None:
            on_epoch(record)
    stopped_early = stopping is not None and len(history) < program.train.epochs
    if stopping is not None and best_weights is not None:
        runner.load(best_weights)
    values = runner.values()
    weights = {n: v.numpy().copy() for n, v in values.items() if n in weight_names}
    final = {name: evaluator.metrics(values, d) for name, d in data.items()}
    best_epoch = best_epoch if stopping is not None else len(history)
    return TrainResult(weights, tuple(history), final, best_epoch, stopped_early, step,
                       resume.epoch if resume is not None else 0)
