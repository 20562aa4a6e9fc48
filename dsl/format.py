"""The canonical form of a .dln text (`dlnc fmt`).

One statement per line, blocks opened on their statement's line and closed on their own,
two spaces of indentation, `key=value` options (`NAME = VALUE` in `param` and search
statements), `, ` between items only where the source used commas. Comments are kept: a
comment on its own line stays above what followed it, a trailing comment stays at the end
of the line of what it followed. Runs of blank lines become one. Numbers keep their
spelling, params stay params: loading the result gives the same `Program`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .syntax import Block, Call, Index, Number, Option, Statement, String, Syntax, Word

INDENT = "  "


# ---------------------------------------------------------------- items
def format_value(value) -> str:
    if isinstance(value, Number):
        return value.text
    if isinstance(value, String):
        return _quote(value.value)
    if isinstance(value, Word):
        return value.name
    inner = ", ".join(format_value(a) for a in value.args)
    if isinstance(value, Call):
        return f"{value.name}({inner})"
    if isinstance(value, Index):
        return f"{value.name}[{inner}]"
    return f"[{inner}]"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\t", "\\t") + '"'


def format_item(item, spaced: bool) -> str:
    """An item; options as `key=value`, or `key = value` when `spaced`."""
    if isinstance(item, Option):
        eq = " = " if spaced else "="
        return f"{item.key}{eq}{format_value(item.value)}"
    return format_value(item)


def format_head(stmt: Statement) -> str:
    """A statement without its block: `[label:] keyword items` or `keyword label: items`."""
    spaced = stmt.keyword is None or stmt.keyword.name == "param"
    items = [format_item(i, spaced) for i in stmt.items]
    words = ([stmt.keyword.name] if stmt.keyword else [])
    if stmt.label and not stmt.label_first:
        words.append(f"{stmt.label.name}:")
    body = (", " if stmt.commas else " ").join(items)
    head = " ".join(w for w in (" ".join(words), body) if w)
    if stmt.label and stmt.label_first:
        head = f"{stmt.label.name}: {head}"
    return head


# ---------------------------------------------------------------- comments
@dataclass(frozen=True)
class Comment:
    line: int
    text: str
    alone: bool                     # on a line of its own


def comments(text: str) -> list[Comment]:
    """The `#` comments of `text` (a `#` inside a string is no comment)."""
    found = []
    for number, line in enumerate(text.split("\n"), start=1):     # the parser's lines (not \x85, \u2028, ...)
        at = _comment_start(line)
        if at is not None:
            found.append(Comment(number, line[at:].rstrip(), not line[:at].strip()))
    return found


def _comment_start(line: str) -> int | None:
    quoted, escaped = False, False
    for i, c in enumerate(line):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            return i
    return None


# ---------------------------------------------------------------- the walk
@dataclass(frozen=True)
class Event:
    """One output line: a statement, a block's opening line, or its `}`."""

    text: str
    depth: int
    start: int                      # the source line it starts on
    end: int                        # the source line a trailing comment would follow


def events(syntax: Syntax) -> list[Event]:
    """The output lines in order, by an explicit-stack walk of the statements."""
    out: list[Event] = []
    stack: list[tuple[object, int]] = [(s, 0) for s in reversed(syntax.statements)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Block):
            out.append(Event("}", depth, node.span.end_line, node.span.end_line))
        elif node.block is None:
            out.append(Event(format_head(node), depth, node.span.line, node.span.end_line))
        else:
            out.append(Event(format_head(node) + " {", depth, node.span.line,
                             node.block.span.line))
            stack.append((node.block, depth))
            stack.extend((s, depth + 1) for s in reversed(node.block.statements))
    return out


def format_syntax(syntax: Syntax, text: str) -> str:
    """The canonical text of `syntax`, with the comments and blank lines of `text`."""
    evs = events(syntax)
    notes = comments(text)
    trailing = {c.line: c.text for c in notes if not c.alone}
    owner = {e.end: i for i, e in enumerate(evs)}       # the last event ending on each line
    alone = [c for c in notes if c.alone]
    blank = {n for n, line in enumerate(text.split("\n"), start=1) if not line.strip()}
    lines: list[str] = []
    last = 0                                            # the last source line written
    for i, e in enumerate(evs):
        inner = e.depth + (1 if e.text == "}" else 0)
        while alone and alone[0].line < e.start:
            c = alone.pop(0)
            _blank_between(lines, blank, last, c.line)
            lines.append(INDENT * inner + c.text)
            last = c.line
        if e.text != "}":
            _blank_between(lines, blank, last, e.start)
        note = trailing.pop(e.end) if owner.get(e.end) == i and e.end in trailing else None
        lines.append(INDENT * e.depth + e.text + (f"  {note}" if note else ""))
        last = max(last, e.end)
    for c in alone + [Comment(n, t, False) for n, t in trailing.items()]:
        _blank_between(lines, blank, last, c.line)
        lines.append(c.text)
        last = c.line
    return "\n".join(lines) + "\n" if lines else ""


def _blank_between(lines: list[str], blank: set[int], last: int, line: int) -> None:
    """One blank line where the source had any between `last` and `line` (not at the top)."""
    opened = lines and lines[-1].endswith("{")
    if lines and not opened and any(last < n < line for n in blank):
        lines.append("")
