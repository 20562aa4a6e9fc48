"""Golden error messages: each tests/golden/errors/NAME.dln must fail with exactly NAME.err.

A `.err` file holds the rendered `DlnError` (`file:line:col: error: message`, the source
line, the caret), with the path relative to the golden folder so the files are stable.
Lines `# --set NAME=VALUE` in a `.dln` are passed as overrides. Regenerate with
`UPDATE_GOLDEN=1 python -m pytest tests/test_golden_errors.py`.
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Mapping

import pytest

import dsl
from compiler.program import compile_program
from dsl import DlnError


def check_text(text: str, path: str, overrides: Mapping[str, str] | None = None):
    """Everything `dlnc check` does to a program; raises `DlnError` on the first problem."""
    program = dsl.load(text, path=path, overrides=overrides)
    compile_program(program)
    return program


GOLDEN = pathlib.Path(__file__).parent / "golden" / "errors"
CASES = sorted(GOLDEN.glob("*.dln"))
SET = re.compile(r"^# --set (\w+)=(.*)$", re.MULTILINE)


def rendered_error(case: pathlib.Path) -> str:
    text = case.read_text(encoding="utf-8")
    overrides = dict(SET.findall(text))
    with pytest.raises(DlnError) as e:
        check_text(text, case.name, overrides or None)
    return e.value.render() + "\n"


def test_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_error_message(case):
    got = rendered_error(case)
    expected = case.with_suffix(".err")
    if os.environ.get("UPDATE_GOLDEN"):
        expected.write_text(got, encoding="utf-8")
    assert expected.exists(), f"no {expected.name}: run with UPDATE_GOLDEN=1 to write it"
    assert got == expected.read_text(encoding="utf-8")
