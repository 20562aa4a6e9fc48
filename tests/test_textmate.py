"""editors/dln.tmLanguage.json: the TextMate grammar editors use for .dln files.

A small tokenizer applies the grammar as TextMate does (at each position the pattern that
matches first wins, ties go to the earlier pattern; begin/end rules carry over lines), and
every token dlnc's own lexer finds in the examples must get the scope it should: comments,
strings, numbers, options, labels, keywords, layer kinds, activations. The grammar's word
lists must equal the tables in dsl/, so a new layer or statement cannot be left out.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lark import Lark

from dsl.build import TOP_LEVEL
from dsl.data import DATA_STATEMENTS
from dsl.layers import ACTIVATIONS, LAYERS
from dsl.syntax import grammar_text
from dsl.train import DECAYS, DISTRIBUTIONS, LOSSES, METRICS, OPTIMIZERS, TRAIN_STATEMENTS

from conftest import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
GRAMMAR_PATH = ROOT / "editors" / "dln.tmLanguage.json"
GRAMMAR = json.loads(GRAMMAR_PATH.read_text(encoding="utf-8"))
SOURCES = sorted(EXAMPLES.glob("*.dln")) + sorted((ROOT / "tests" / "golden" / "programs").glob("*.dln"))


# ---------------------------------------------------------------- a TextMate tokenizer (subset)
def _rules(patterns: list[dict]) -> list[dict]:
    """`include`s resolved, nested `patterns` flattened, in order."""
    out = []
    for p in patterns:
        if "include" in p:
            out += _rules([GRAMMAR["repository"][p["include"].lstrip("#")]])
        elif "patterns" in p and "begin" not in p:
            out += _rules(p["patterns"])
        else:
            out.append(p)
    return out


def _compile(rule: dict) -> dict:
    compiled = dict(rule)
    for key in ("match", "begin", "end"):
        if key in rule:
            compiled[key] = re.compile(rule[key])
    if "patterns" in rule:
        compiled["patterns"] = [_compile(r) for r in _rules(rule["patterns"])]
    return compiled


TOP_RULES = [_compile(r) for r in _rules(GRAMMAR["patterns"])]


def _scopes(match: re.Match, rule: dict, captures_key: str, whole: str | None) -> list[tuple[int, int, str]]:
    spans = []
    if whole:
        spans.append((match.start(), match.end(), whole))
    for group, capture in rule.get(captures_key, {}).items():
        if match.group(int(group)) is not None and match.start(int(group)) < match.end(int(group)):
            spans.append((match.start(int(group)), match.end(int(group)), capture["name"]))
    return spans


def _first(rules: list[dict], line: str, pos: int):
    best = None
    for rule in rules:
        m = (rule.get("match") or rule["begin"]).search(line, pos)
        if m and (best is None or m.start() < best[1].start()):
            best = (rule, m)
    return best


def tokenize(text: str) -> list[list[tuple[int, int, str]]]:
    """Per line, (start, end, scope) spans; the innermost scope of a character is the last span
    that covers it."""
    lines, inside = [], None                        # inside: the begin/end rule still open
    for line in text.split("\n"):
        spans, pos = [], 0
        while pos <= len(line):
            if inside is not None:
                end = inside["end"].search(line, pos)
                inner = _first(inside.get("patterns", []), line, pos)
                if inner and (end is None or inner[1].start() < end.start()):
                    rule, m = inner
                    spans += _scopes(m, rule, "captures", rule.get("name"))
                    pos = max(m.end(), pos + 1)
                    continue
                stop = end.end() if end else len(line)
                spans.append((pos, stop, inside["name"]))
                if end:
                    spans += _scopes(end, inside, "endCaptures", None)
                    inside = None
                pos = stop if stop > pos else pos + 1
                if end is None:
                    break
                continue
            found = _first(TOP_RULES, line, pos)
            if found is None:
                break
            rule, m = found
            if "begin" in rule:
                spans += _scopes(m, rule, "beginCaptures", None)
                spans.append((m.start(), m.end(), rule["name"]))
                inside, pos = rule, m.end()
                continue
            spans += _scopes(m, rule, "captures", rule.get("name"))
            pos = m.end() if m.end() > m.start() else m.end() + 1
        lines.append(spans)
    return lines


def scope_at(spans: list[tuple[int, int, str]], column: int) -> list[str]:
    return [scope for start, end, scope in spans if start <= column < end]


# ---------------------------------------------------------------- what each token should be
STATEMENTS = set(DATA_STATEMENTS) | set(TRAIN_STATEMENTS)
CONSTANTS = (set(OPTIMIZERS) | set(DECAYS) | set(LOSSES) | set(METRICS)
             | {"l1", "l2", "full", "same", "valid", "random", "grid", "trainable", "per_step", "vocab", "text",
                "char", "word", "horizontal", "vertical"})
TYPES = {"float", "tokens", "binary", "class", "real"}


def expected_scope(token, next_char: str) -> str:
    if token.type == "COMMENT":
        return "comment.line.number-sign.dln"
    if token.type == "STRING":
        return "string.quoted.double.dln"
    if token.type == "NUMBER":
        return "constant.numeric.dln"
    if token.type != "NAME":
        return {"LBRACE": "punctuation.section.block.dln", "RBRACE": "punctuation.section.block.dln",
                "LSQB": "punctuation.section.brackets.dln", "RSQB": "punctuation.section.brackets.dln",
                "LPAR": "punctuation.section.parens.dln", "RPAR": "punctuation.section.parens.dln",
                "COMMA": "punctuation.separator.comma.dln", "COLON": "punctuation.separator.label.dln",
                "_EQUAL": "keyword.operator.assignment.dln"}.get(token.type, "")
    word = str(token)
    if next_char == "=":
        return "variable.parameter.option.dln"
    if next_char == ":":
        return "entity.name.label.dln"
    for words, scope in ((TOP_LEVEL, "keyword.control.dln"), (LAYERS, "support.type.layer.dln"),
                         (ACTIVATIONS, "support.function.activation.dln"), (STATEMENTS, "keyword.other.statement.dln"),
                         (CONSTANTS, "support.constant.dln"), (TYPES, "storage.type.dln"),
                         (DISTRIBUTIONS, "support.function.distribution.dln")):
        if word in words:
            return scope
    return "variable.other.dln"


def lexer_tokens(text: str):
    return Lark(grammar_text(), parser="lalr", lexer="basic").lex(text, dont_ignore=True)


# ---------------------------------------------------------------- the tests
def test_the_grammar_is_a_textmate_grammar_for_dln():
    assert GRAMMAR["scopeName"] == "source.dln" and GRAMMAR["fileTypes"] == ["dln"]
    for rule in _rules(GRAMMAR["patterns"]):
        assert "name" in rule or "captures" in rule, rule
    package = json.loads((ROOT / "editors" / "package.json").read_text())
    (language,) = package["contributes"]["grammars"]
    assert language["scopeName"] == "source.dln" and (ROOT / "editors" / language["path"]).resolve() == GRAMMAR_PATH
    json.loads((ROOT / "editors" / "language-configuration.json").read_text())


def _words(rule_name: str) -> set[str]:
    match = GRAMMAR["repository"][rule_name]["match"]
    inner = re.fullmatch(r"\\b\((.*)\)\\b", match).group(1)
    return set(inner.split("|"))


@pytest.mark.parametrize("rule,words", [
    ("top-level-keyword", set(TOP_LEVEL)),
    ("layer", set(LAYERS)),
    ("activation", set(ACTIVATIONS)),
    ("statement", STATEMENTS),
    ("constant", CONSTANTS),
    ("type", TYPES),
    ("distribution", set(DISTRIBUTIONS)),
])
def test_word_lists_equal_the_languages_tables(rule, words):
    assert _words(rule) == words


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_token_of_the_examples_gets_its_scope(path):
    text = path.read_text(encoding="utf-8")
    lines = tokenize(text)
    checked = 0
    for token in lexer_tokens(text):
        if token.type in ("_SEP",) or token.type.startswith("__"):
            continue
        rest = text[token.end_pos:]
        next_char = rest.lstrip(" \t")[:1]
        want = expected_scope(token, next_char)
        if not want:
            continue
        spans = lines[token.line - 1]
        for offset in range(len(str(token))):          # every character of the token
            got = scope_at(spans, token.column - 1 + offset)
            assert want in got, f"{path.name}:{token.line}:{token.column} {str(token)!r}: {got} lacks {want}"
        checked += 1
    assert checked > 10


def test_tricky_lines():
    def scopes(line: str, column: int) -> list[str]:
        return scope_at(tokenize(line)[0], column)
    line = 'layers { trunk: pretrained "a#b.onnx" until="flatten_5" }  # cut "here"'
    assert "entity.name.label.dln" in scopes(line, line.index("trunk"))
    assert "string.quoted.double.dln" in scopes(line, line.index("#b"))          # a '#' in a string
    assert "comment.line.number-sign.dln" in scopes(line, line.index('"here"'))  # a string in a comment
    line = "dense_1 dense 64 relu leaky_relu(0.2) -3 1e-4 x2"
    assert scopes(line, 0) == ["variable.other.dln"] and scopes(line, 6) == ["variable.other.dln"]
    assert scopes(line, line.index("dense ")) == ["support.type.layer.dln"]
    assert scopes(line, line.index("64")) == ["constant.numeric.dln"]
    assert scopes(line, line.index("leaky")) == ["support.function.activation.dln"]
    assert scopes(line, line.index("-3")) == ["constant.numeric.dln"]
    assert scopes(line, line.index("1e-4") + 3) == ["constant.numeric.dln"]
    assert scopes(line, line.index("x2") + 1) == ["variable.other.dln"]
    line = 'source "a\\"b" text'
    assert "constant.character.escape.dln" in scopes(line, line.index('\\"'))
    assert "support.constant.dln" in scopes(line, line.index("text"))
    line = 'source "unterminated'
    assert "string.quoted.double.dln" in scopes(line, len(line) - 1)
    assert tokenize('source "open\nmodel m')[1][0][2] == "keyword.control.dln"   # strings end at the line end
