"""The one error type of the front end, and how it renders.

Every user error in dlnc (language, data, files, options) is a `DlnError`. It renders as

    file:line:col: error: message
      <the source line>
      ^^^^

or, when there is no position in a source text, as `file: error: message` (the field, row
or index goes into the message). The command line prints it and exits with code 2.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Span:
    """A region of a source text; lines and columns count from 1, `end_column` is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def point(line: int, column: int) -> "Span":
        return Span(line, column, line, column + 1)


class DlnError(Exception):
    """A user error: a message, and where it happened (a file, and a span in its text)."""

    def __init__(self, message: str, *, span: Span | None = None, path: str | None = None,
                 source: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.path = path
        self.source = source

    def located(self, path: str | None, source: str | None) -> "DlnError":
        """This error, with the file and its text filled in where they were missing."""
        return DlnError(self.message, span=self.span, path=self.path or path,
                        source=self.source if self.source is not None else source)

    def render(self) -> str:
        where = self.path or "<input>"
        if self.span is None:
            return f"{where}: error: {self.message}"
        head = f"{where}:{self.span.line}:{self.span.column}: error: {self.message}"
        lines = (self.source or "").split("\n")       # lines as the parser counts them (not \f, \x1c, ...)
        if not 1 <= self.span.line <= len(lines):
            return head
        text = lines[self.span.line - 1].expandtabs(1).rstrip("\r")
        start = max(self.span.column - 1, 0)
        end = self.span.end_column - 1 if self.span.end_line == self.span.line else len(text)
        width = max(1, min(end, len(text)) - start)
        return f"{head}\n  {text}\n  {' ' * start}{'^' * width}"

    def __str__(self) -> str:
        return self.render()


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' — did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
