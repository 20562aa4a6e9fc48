"""`dlnc run`: train a program in a run folder, with checkpoints, and export what it learned.

The run folder (`runs/<model>-<time>/`, or `-o DIR`) holds:
- `config.json`: the resolved hyperparameters, the loss and optimiser inputs, and the hashes
  of the program, the configuration and the data (written when training starts);
- `train_step.onnx`: the training graph (written when training starts);
- `checkpoints/`: the newest complete checkpoint (see `checkpoint.py`);
- `metrics.jsonl`: one line per epoch: the cost, the learning rate, loss and error per split;
- `model.onnx`, `report.txt`, `report.json`: written when training ends;
- `curves.png`: redrawn after every epoch (at most once a second, and whenever a graph input
  was changed), so the user can watch J while it trains;
- `control.json` (optional): graph inputs to change while it trains (`dlnc tune`, control.py).

Nothing is written before the program compiles and the data loads. A folder that already
holds a run is only reused with `--force` (start over: the old run's files are removed) or
`--resume` (go on from its newest complete checkpoint, which must belong to this program,
configuration and data; the final weights are then bit-identical to an uninterrupted run).

Checkpoints are written at the end of every epoch, spaced at least `--checkpoint-interval`
seconds apart (default 1 s; 0 writes one after every epoch) so that tiny epochs do not spend
their time in fsync; the last epoch always gets one. A failed write (a full disk, a read-only
folder) is a user error that leaves the previous checkpoint in place and no temporary file.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from compiler import __version__
from compiler.program import Compiled, with_weights
from dsl import ast
from dsl.errors import DlnError

from . import checkpoint, report
from .analysis import analyse, analysis_json, analysis_text
from .control import CONTROL_FILE, ControlFile
from .data import Splits
from .files import remove_temporaries, write_atomic, write_error
from .trainer import NonFiniteError, Snapshot, TrainResult, check_early_stopping, named_splits, train

RUN_FILES = ("model.onnx", "train_step.onnx", "metrics.jsonl", "report.txt", "report.json", "curves.png",
             "config.json", checkpoint.FOLDER, CONTROL_FILE)
DEFAULT_CHECKPOINT_INTERVAL = 1.0
CURVES_INTERVAL = 1.0          # seconds between two redraws of curves.png while training


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def choose_folder(output: str | None, model: str, *, force: bool, resume: bool) -> Path:
    """The run folder, checked but not created: DlnError when it cannot be used."""
    if output is None:
        if resume:
            raise DlnError("--resume needs the run folder to continue: dlnc run MODEL.dln -o DIR --resume",
                           path="dlnc run")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{model}-{stamp}"
        number = 2
        while out.exists():
            out = Path("runs") / f"{model}-{stamp}-{number}"
            number += 1
        _check_creatable(out)
        return out
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DlnError(f"{out} is a file, not a run folder — choose another -o", path="dlnc run")
    if resume:
        if not out.is_dir():
            raise DlnError(f"there is no run to resume in {out} (no such folder) — drop --resume to start one",
                           path="dlnc run")
        return out
    if holds_run(out) and not force:
        raise DlnError(f"{out} already holds a run; pass --force to overwrite it, --resume to continue it, "
                       "or choose another -o", path="dlnc run")
    _check_creatable(out)
    return out


def _check_creatable(out: Path) -> None:
    """A clear error now, rather than after training, when `out` cannot become a folder."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DlnError(f"cannot create the run folder {out}: {parent} is a file, not a folder — "
                       "choose another -o", path="dlnc run")


def identity(program: ast.Program, compiled: Compiled, splits: Splits, config: dict) -> checkpoint.Identity:
    spec = compiled.spec
    layout = {p.name: p.init for p in spec.params} | {s.name: s.init for s in spec.state}   # as StepRunner.arrays()
    return checkpoint.Identity(program.name, config["source_sha256"], config["config_sha256"],
                               splits.source_hash, checkpoint.layout_hash(layout))


@dataclass
class Checkpointer:
    """Saves the trainer's snapshots (at most one per `interval` seconds, and always the last)."""

    folder: Path
    ident: checkpoint.Identity
    epochs: int
    interval: float
    last_saved: float = 0.0
    saved_epoch: int = 0

    def __post_init__(self):
        self.last_saved = time.monotonic()

    def __call__(self, snap: Snapshot) -> None:
        final = snap.stopped or snap.epoch >= self.epochs
        if not final and time.monotonic() - self.last_saved < self.interval:
            return
        arrays = dict(snap.arrays)
        if snap.best_arrays is not None:
            arrays |= {checkpoint.BEST + name: a for name, a in snap.best_arrays.items()}
        meta = {**self.ident.as_json(), "dlnc_version": __version__,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **snap.meta()}
        checkpoint.save(self.folder / checkpoint.FOLDER, snap.epoch, arrays, meta)
        write_metrics(self.folder, snap.history)
        self.last_saved = time.monotonic()
        self.saved_epoch = snap.epoch


class Watcher:
    """After every epoch: the progress bar, metrics.jsonl and a redrawn curves.png (at most once
    per `interval` seconds, and at every epoch that changed a graph input)."""

    def __init__(self, program: ast.Program, folder: Path, bar, history=(), interval: float = CURVES_INTERVAL):
        self.program, self.folder, self.bar, self.interval = program, folder, bar, interval
        self.history = list(history)
        self.drawn = time.monotonic()

    def __call__(self, record) -> None:
        self.bar.update(record)
        self.history.append(record)
        if not self.folder.is_dir():
            return
        write_metrics(self.folder, self.history)
        if record.changes or time.monotonic() - self.drawn >= self.interval:
            write_curves(self.program, self.folder, self.history)
            self.drawn = time.monotonic()


def write_curves(program: ast.Program, folder: Path, history) -> None:
    from .plots import curves_png
    human = program.data.human_error if program.data is not None else None
    write_atomic(folder / "curves.png", curves_png(history, f"{program.name}: loss and error per epoch",
                                                   real=program.output.kind == "real", human_error=human))


def write_metrics(folder: Path, history) -> None:
    lines = [json.dumps(report.epoch_json(r)) for r in history]
    write_atomic(folder / "metrics.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())


def _start_over(out: Path) -> None:
    """--force: remove the old run's files (only those dlnc writes)."""
    for name in RUN_FILES:
        target = out / name
        try:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        except OSError as exc:
            raise write_error(target, exc) from None


def run(program: ast.Program, compiled: Compiled, splits: Splits, out: Path, *, device: str = "cpu",
        threads: int | None = None, resume: bool = False, force: bool = False, check_numerics: bool = False,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL, quiet: bool = False,
        as_json: bool = False, source_hash: str = "") -> dict:
    """Train in `out` and write the run folder; returns report.json's content."""
    check_early_stopping(program, named_splits(splits))
    config = report.config_json(program, source_hash, compiled=compiled, data_hash=splits.source_hash)
    ident = identity(program, compiled, splits, config)
    chatty = not (quiet or as_json)
    start = None
    if resume:
        found = checkpoint.latest(out / checkpoint.FOLDER, ident)
        if found is not None:
            start = Snapshot.from_saved(found.meta, found.arrays, checkpoint.BEST)
            if chatty:
                print(f"resuming {out} from epoch {found.epoch} (step {found.step})", file=sys.stderr)
        elif chatty:
            print(f"no complete checkpoint in {out}; starting from the beginning", file=sys.stderr)

    def prepare() -> None:
        """Once the sessions exist: clear the way and write config.json and train_step.onnx."""
        if force and not resume and out.exists():
            _start_over(out)
        checkpoint.clean(out / checkpoint.FOLDER)
        if out.is_dir():
            remove_temporaries(out, RUN_FILES)
        if not resume or not (out / "config.json").exists():
            write_atomic(out / "config.json", json.dumps(config, indent=2).encode())
        if not resume or not (out / "train_step.onnx").exists():
            write_atomic(out / "train_step.onnx", compiled.train_step.SerializeToString())

    saver = Checkpointer(out, ident, program.train.epochs, checkpoint_interval)
    bar = report.progress(program.train.epochs, enabled=chatty, initial=start.epoch if start else 0)
    watcher = Watcher(program, out, bar, start.history if start else ())
    control = ControlFile(out, compiled.spec.hyper)
    try:
        result = train(compiled, splits, device=device, threads=threads, on_epoch=watcher,
                       on_checkpoint=saver, resume=start, check_numerics=check_numerics, on_start=prepare,
                       control=control)
        return finish(program, compiled, splits, result, out, config)
    except NonFiniteError as exc:
        raise DlnError(exc.message + _checkpoint_note(out, "is kept"), span=exc.span, path=exc.path,
                       source=exc.source) from None
    except DlnError as exc:
        if not exc.message.startswith("cannot write"):
            raise
        raise DlnError(exc.message + _checkpoint_note(out, "is intact", "; fix this, then continue with --resume"),
                       path=exc.path) from None
    finally:
        bar.close()


def _checkpoint_note(out: Path, state: str, then: str = "") -> str:
    done = checkpoint.complete(out / checkpoint.FOLDER)
    if not done:
        return "; no checkpoint had been written yet"
    return f"; the last good checkpoint (epoch {done[0][1]}) {state} in {out / checkpoint.FOLDER}{then}"


def finish(program: ast.Program, compiled: Compiled, splits: Splits, result: TrainResult, out: Path,
           config: dict) -> dict:
    """Write model.onnx, metrics.jsonl, the reports and curves.png; returns report.json's content."""
    errors = {name: m.error for name, m in result.final.items()}
    human = program.data.human_error if program.data is not None else None
    analysis = analyse(errors, human, real=program.output.kind == "real",
                       dev_distribution=splits.dev_distribution, test_distribution=splits.test_distribution)
    summary = report.summary_json(program, result, out) | {
        "resumed_from_epoch": result.resumed_from, "steps": result.steps,
        "analysis": analysis_json(analysis), "config_sha256": config["config_sha256"],
        "files": [name for name in RUN_FILES if name not in (checkpoint.FOLDER, CONTROL_FILE)]
                 + [checkpoint.FOLDER + "/"]}
    text = (report.summary_text(program, result, out) + "\n\n" + analysis_text(analysis)
            + f"\n\nwrote {out / 'model.onnx'}; the run folder {out} holds the report, curves.png and metrics")
    trained = with_weights(compiled.model, result.weights)
    write_metrics(out, result.history)
    write_curves(program, out, result.history)
    write_atomic(out / "report.txt", (text + "\n").encode())
    write_atomic(out / "report.json", json.dumps(summary, indent=2).encode())
    write_atomic(out / "model.onnx", trained.SerializeToString())
    summary["text"] = text
    return summary
