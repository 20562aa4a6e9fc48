"""Shared fixtures: the examples folder and an in-process `dlnc` that captures its output."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def dlnc(capsys):
    """Run the command line in-process: dlnc("run", "m.dln", ...) -> Result(code, out, err)."""
    def run(*argv: str) -> Result:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    return run


def write(folder: Path, text: str, name: str = "m.dln") -> Path:
    """A program file `name` in `folder` holding `text`."""
    path = folder / name
    path.write_text(text)
    return path


def with_epochs(text: str, epochs: int) -> str:
    """The program text with its `epochs` statement replaced (a short schedule for tests)."""
    return re.sub(r"\bepochs\s+\d+", f"epochs {epochs}", text)


# a small classifier on iris that trains in well under a second
TINY = """model tiny
data { source "iris"; split train=0.6 dev=0.2 test=0.2; normalize }
input x: float[4]
output y: class[3]
layers { hidden: dense 8 tanh; dense 3 softmax }
train { optimizer adam lr=0.05; batch_size 16; epochs 20; seed 3 }
"""


def crash_after(monkeypatch, epoch: int):
    """Make `dlnc run` stop like a crash right after the checkpoint of `epoch` is written.
    Returns the unpatched Checkpointer.__call__, to set back before a run that must finish."""
    from runtime import run
    original = run.Checkpointer.__call__

    def call(self, snap):
        original(self, snap)
        if snap.epoch == epoch:
            raise KeyboardInterrupt
    monkeypatch.setattr(run.Checkpointer, "__call__", call)
    return original
