"""Babysitting one model (the notes' panda approach): change graph inputs while `dlnc run` trains.

A run folder may hold `control.json`, an object of graph inputs and the values wanted for them:

    {"lr": 0.001, "dropout_2.keep_prob": 0.9}

`dlnc tune RUNDIR --set lr=0.001` writes it (atomically, merged with what it already holds), or
the user edits it by hand. Before every epoch `dlnc run` reads it again; a value that differs
from the one the graph gets now is fed from that epoch on (no restart: these are inputs of the
compiled training graph), printed, logged in metrics.jsonl as the epoch's `changes`, and marked
on curves.png. The graph inputs are the run's `graph_inputs` in config.json (`lr`, `beta`,
`beta1`, `beta2`, `eps`, `lambda`, `<layer>.keep_prob`, `decay_rate`, `clip_norm`, ...) except
`epoch`, which the loop sets itself. A file that does not parse (half-saved by an editor), an
unknown name or a bad value is reported once and skipped; training goes on.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Mapping

from dsl.errors import DlnError, did_you_mean

from .files import write_atomic

CONTROL_FILE = "control.json"
NOT_TUNABLE = frozenset({"epoch"})


def tunable(graph_inputs: Mapping[str, float]) -> dict[str, float]:
    """The graph inputs a user may change while a run trains, with the program's values."""
    return {name: float(v) for name, v in graph_inputs.items() if name not in NOT_TUNABLE}


def check_value(name: str, value: float) -> str | None:
    """Why `value` cannot be fed as `name` (None when it can)."""
    if not math.isfinite(value):
        return f"{name} must be a finite number"
    if name.endswith(".keep_prob") and not 0.0 < value <= 1.0:
        return f"{name} is a keep probability: 0 < {name} ≤ 1"
    if name in ("beta", "beta1", "beta2") and not 0.0 <= value < 1.0:
        return f"{name} is an averaging weight: 0 ≤ {name} < 1"
    if name in ("lr", "eps", "clip_norm", "decay_every") and value <= 0.0:
        return f"{name} must be positive"
    if name in ("lambda", "decay_rate") and value < 0.0:
        return f"{name} must not be negative"
    return None


def parse_control(text: str, names: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """(valid values, problems) of control.json's text, against the tunable `names`."""
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        return {}, [f"{CONTROL_FILE} is not valid JSON ({exc.msg} at line {exc.lineno}); it is ignored until fixed"]
    if not isinstance(data, dict):
        return {}, [f"{CONTROL_FILE} must hold a JSON object like {{\"lr\": 0.001}}; it is ignored until fixed"]
    values, problems = {}, []
    for name, value in data.items():
        if name not in names:
            problems.append(f"{CONTROL_FILE}: '{name}' is not a graph input of this run"
                            f"{did_you_mean(name, names) or ''}; the tunable ones are {', '.join(names)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{CONTROL_FILE}: {name} must be a number, not {json.dumps(value)}")
        elif (why := check_value(name, float(value))) is not None:
            problems.append(f"{CONTROL_FILE}: {why}; {name} = {value} is ignored")
        else:
            values[name] = float(value)
    return values, problems


class ControlFile:
    """The trainer's `control` hook: the values control.json wants, read before each epoch."""

    def __init__(self, folder: Path, names: Mapping[str, float], *,
                 say: Callable[[str], None] | None = None):
        self.path = Path(folder) / CONTROL_FILE
        self.names = tunable(names)
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self._seen: tuple | None = None           # (inode, mtime_ns, size) of the version read last
        self._wanted: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            stat = self.path.stat()
        except OSError:
            self._seen, self._wanted = None, {}
            return {}
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)      # an atomic rewrite is a new inode
        if version != self._seen:
            self._seen = version
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.say(f"dlnc: cannot read {self.path}: {exc}; it is ignored")
                self._wanted = {}
                return {}
            self._wanted, problems = parse_control(text, self.names)
            for problem in problems:
                self.say(f"dlnc: {problem}")
        return self._wanted

    def __call__(self, epoch: int, current: Mapping[str, float]) -> dict[str, float]:
        """The values to change before `epoch` (from 0): those control.json wants that differ."""
        changes = {name: v for name, v in self._read().items() if name in current and current[name] != v}
        if changes:
            shown = ", ".join(f"{name} {current[name]:g} → {v:g}" for name, v in changes.items())
            self.say(f"dlnc: epoch {epoch + 1}: {shown} ({CONTROL_FILE})")
        return changes


# ---------------------------------------------------------------- dlnc tune
def run_config(folder: Path) -> dict:
    """config.json of a run folder; DlnError when `folder` is not one."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise DlnError(f"{folder} is not a run folder (no such folder); give the -o folder of a dlnc run",
                       path="dlnc tune")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlnError(f"{folder} is not a run folder yet (it has no config.json; dlnc run writes it when "
                       f"training starts)", path="dlnc tune") from None
    except (OSError, ValueError) as exc:
        raise DlnError(f"cannot read {path}: {exc}", path="dlnc tune") from None
    if not isinstance(config, dict) or not isinstance(config.get("graph_inputs"), dict):
        raise DlnError(f"{path} names no graph inputs; it was not written by this version of dlnc run",
                       path="dlnc tune")
    return config


def current_values(folder: Path, config: dict) -> dict[str, float]:
    """The values the run uses now: the program's, then each change metrics.jsonl logged."""
    values = tunable(config["graph_inputs"])
    try:
        lines = (Path(folder) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            values.update({k: float(v) for k, v in json.loads(line).get("changes", {}).items() if k in values})
        except (ValueError, AttributeError, TypeError):
            continue
    return values


def tune(folder: Path, settings: Mapping[str, str]) -> str:
    """`dlnc tune RUNDIR [--set NAME=VALUE]...`: merge the settings into control.json; the report."""
    folder = Path(folder)
    config = run_config(folder)
    names = tunable(config["graph_inputs"])
    now = current_values(folder, config)
    path = folder / CONTROL_FILE
    existing: dict = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8") or "{}")
            existing = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            existing = {}
    if not settings:
        rows = [f"  {name:<24} {now[name]:<12g}" + (f" (control.json asks {existing[name]})"
                                                      if name in existing and existing[name] != now[name] else "")
                for name in names]
        return "\n".join([f"{folder}: graph inputs that dlnc tune can change while the run trains:", *rows,
                          f"change one with: dlnc tune {folder} --set NAME=VALUE"])
    wanted = {}
    for name, text in settings.items():
        if name not in names:
            hint = did_you_mean(name, names) or f"; the tunable graph inputs are {', '.join(names)}"
            raise DlnError(f"--set {name}={text}: '{name}' is not a graph input of this run{hint}", path="dlnc tune")
        try:
            value = float(text)
        except ValueError:
            raise DlnError(f"--set {name}={text}: {name} takes a number", path="dlnc tune") from None
        why = check_value(name, value)
        if why is not None:
            raise DlnError(f"--set {name}={text}: {why}", path="dlnc tune")
        wanted[name] = value
    merged = {k: v for k, v in existing.items() if k in names} | wanted
    write_atomic(path, (json.dumps(merged, indent=2) + "\n").encode())
    finished = (folder / "report.json").exists()
    lines = [f"wrote {path}: " + ", ".join(f"{k} = {v:g} (now {now[k]:g})" for k, v in wanted.items())]
    lines.append("the run has finished; the values apply if it is resumed (dlnc run ... --resume)" if finished
                 else "dlnc run applies them at the start of the next epoch")
    return "\n".join(lines)
