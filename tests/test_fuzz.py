"""Fuzzing the front end: no input crashes dlnc.

Properties, each with a fixed example budget in CI (derandomized, so every run tries the same
inputs; see `budget`):
- programs generated from grammars/dln.lark itself (`hypothesis.extra.lark.from_lark`), with
  explicit strategies for numbers (0, negatives, huge, nan/inf spellings), names and strings;
- valid programs with one word or number replaced by an edge case, compiled;
- arbitrary text, text over the language's own characters, and arbitrary bytes (via a file);
- 10,000-deep nesting of every bracket;
every input ends in success or a `DlnError` with a location (`file:line:col: error:`) — never
another exception, a RecursionError or a hang (a deadline per example).
- Valid random dense (and, once they compile, conv and pooling) programs compile, pass the
  ONNX checker, give outputs of the declared shape, and `load(fmt(t)) == load(t)`.

A larger run with another seed: DLNC_FUZZ_SEED=7 DLNC_FUZZ_SCALE=20 pytest tests/test_fuzz.py
(the seed turns derandomization off; the scale multiplies every budget). Each test prints the
number of examples it tried (pytest -s, or -rP).
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark
from lark import Lark

import dsl
from compiler.program import compile_program
from dsl import DlnError
from dsl.build import TOP_LEVEL
from dsl.data import BUILTINS, DATA_STATEMENTS
from dsl.layers import ACTIVATIONS, LAYERS
from dsl.syntax import grammar_text
from dsl.train import DECAYS, LOSSES, OPTIMIZERS, TRAIN_STATEMENTS
from runtime.cli import main

FUZZ_SEED = os.environ.get("DLNC_FUZZ_SEED")
FUZZ_SCALE = float(os.environ.get("DLNC_FUZZ_SCALE", "1"))
PATH = "fuzz.dln"
LOCATED = re.compile(r"^fuzz\.dln:\d+:\d+: error: ")


def budget(examples: int):
    """settings for `examples` examples: derandomized in CI, or seeded by DLNC_FUZZ_SEED."""
    chosen = settings(max_examples=max(1, int(examples * FUZZ_SCALE)), derandomize=FUZZ_SEED is None,
                      database=None, deadline=timedelta(seconds=10), print_blob=True,
                      suppress_health_check=list(HealthCheck))

    def wrap(test):
        test = chosen(test)
        return seed(int(FUZZ_SEED))(test) if FUZZ_SEED is not None else test
    return wrap


def report(test_name: str, seen: list, record_property) -> None:
    """Record and print how many examples a property tried."""
    record_property("examples", len(seen))
    print(f"\n{test_name}: {len(seen)} examples")
    assert seen


# ---------------------------------------------------------------- the property
def located(error: DlnError) -> str:
    rendered = error.render()
    assert LOCATED.match(rendered), rendered
    return rendered


def outcome(text: str, compile_too: bool = True) -> str:
    """'ok' or 'error'; anything but a located DlnError fails the test."""
    try:
        program = dsl.load(text, PATH)
    except DlnError as error:
        located(error)
        _fmt_agrees(text, None)
        return "error"
    _fmt_agrees(text, program)
    if compile_too:
        try:
            compile_program(program)
        except DlnError as error:
            assert error.span is not None, error.render()
            return "error"
    return "ok"


def _fmt_agrees(text: str, program) -> None:
    """fmt never crashes; what it prints loads to the same program (or fails as well) and is a
    fixed point."""
    try:
        formatted = dsl.format_source(text, PATH)
    except DlnError as error:
        located(error)
        assert program is None, "fmt rejects a program that loads"
        return
    again = dsl.format_source(formatted, PATH)
    assert again == formatted, "fmt is not idempotent"
    try:
        reloaded = dsl.load(formatted, PATH)
    except DlnError:
        assert program is None, "fmt broke a program that loads"
        return
    assert program is not None and reloaded == program, "fmt changed the program"


# ---------------------------------------------------------------- strategies
NUMBERS = ["0", "-0", "0.0", "00", "1", "-1", "-3", "2", "3", "8", "10", "64", "0.5", ".5", "5.", "1e-4", "1E5",
           "-1e-8", "1e308", "1e309", "-1e400", "1e-400", "4294967296", "9223372036854775808", "9" * 40,
           "1" * 4301, "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e", "0x10", "1_000"]
WORDS = sorted({*TOP_LEVEL, *LAYERS, *ACTIVATIONS, *DATA_STATEMENTS, *TRAIN_STATEMENTS, *OPTIMIZERS, *DECAYS,
                *LOSSES, *BUILTINS, "float", "tokens", "binary", "class", "real", "per_step", "vocab", "full",
                "same", "valid", "random", "grid", "l1", "l2", "size", "stride", "padding", "keep_prob", "lr",
                "beta", "beta1", "beta2", "eps", "momentum", "rate", "every", "factor", "lambda", "patience",
                "metric", "dev_loss", "dev_error", "trials", "rounds", "uniform", "log_uniform", "choice", "x",
                "y", "m", "trunk", "hidden", "nan", "inf", "last", "trainable", "until", "text", "level"})
NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
NUMBER_RE = r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"


def spaced(strategy):
    """A token, sometimes with a space after it (from_lark joins tokens without any)."""
    return strategy.flatmap(lambda s: st.sampled_from([s + " ", s]))


numbers = spaced(st.one_of(st.sampled_from(NUMBERS), st.from_regex(NUMBER_RE, fullmatch=True),
                           st.integers().map(str), st.floats().map(repr)))
names = spaced(st.one_of(st.sampled_from(WORDS), st.from_regex(NAME_RE, fullmatch=True)))
strings = st.one_of(st.sampled_from(['"digits"', '""', '"a\\"b"', '"model.onnx"', '"é"', '"\\\\"', '"x.npz"',
                                     '"t.csv"', '"\\n"']),
                    st.from_regex(r'"([^"\\\n]|\\.)*"', fullmatch=True))


@functools.cache
def grammar() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual")


programs_from_grammar = from_lark(grammar(), explicit={
    "NUMBER": numbers, "NAME": names, "STRING": strings,
    "_SEP": st.sampled_from(["\n", ";", "\n\n", " ; ", "\r\n", "\n  "]),
    "COMMENT": st.sampled_from(["# c\n", "#\n", "# { ( [ \" \n", "# dense 3\n"]),
})


# ---------------------------------------------------------------- (a) from the grammar
def test_programs_from_the_grammar_load_or_fail_with_a_location(record_property):
    seen: list = []
    @budget(400)
    @given(programs_from_grammar)
    def check(text):
        seen.append(1)
        outcome(text)
    check()
    report('test_programs_from_the_grammar_load_or_fail_with_a_location', seen, record_property)


def test_programs_from_the_grammar_inside_blocks(record_property):
    """The same, after a valid head and inside each block, so the generated statements reach
    the layer, train, data and search readers rather than stopping at 'model NAME'."""
    heads = st.sampled_from(["model m\ninput x: float[4]\noutput y: class[3]\n" + block for block in
                             ("", "layers {\n", "train {\n", "data {\n", "layers { dense 3 softmax }\ntrain {\n",
                              "layers { dense 3 softmax }\ndata {\n", "param a = 2\nsearch grid {\n",
                              "layers { dense 3 softmax }\nsearch random trials=3 {\n")])

    seen: list = []
    @budget(300)
    @given(heads, programs_from_grammar, st.sampled_from(["", "\n}\n"]))
    def check(head, text, close):
        seen.append(1)
        outcome(head + text + close)
    check()
    report('test_programs_from_the_grammar_inside_blocks', seen, record_property)


# ---------------------------------------------------------------- (a') valid programs, one token changed
EDGE_NUMBERS = ["0", "-0", "-1", "-3", "0.5", "1e-400", "1e309", "-1e400", "1e30", "4294967296", "9" * 40,
                "1" * 4301, "nan", "inf", "-inf", "1e5", "0.999999", "2"]
TOKEN = re.compile(r'"([^"\\\n]|\\.)*"|' + NUMBER_RE + "|" + NAME_RE)


@st.composite
def mutated_programs(draw):
    text = draw(valid_programs()).text
    tokens = list(TOKEN.finditer(text))
    token = draw(st.sampled_from(tokens))
    replacement = draw(st.one_of(st.sampled_from(EDGE_NUMBERS), st.sampled_from(WORDS), st.just(""),
                                 st.sampled_from(["{", "}", "(", ")", "[", "]", ":", ",", "=", ";", "\n", '"s"'])))
    return text[:token.start()] + replacement + text[token.end():]


def test_valid_programs_with_one_token_changed_load_or_fail_with_a_location(record_property):
    seen: list = []
    @budget(300)
    @given(mutated_programs())
    def check(text):
        seen.append(1)
        note(text)
        outcome(text)
    check()
    report('test_valid_programs_with_one_token_changed_load_or_fail_with_a_location', seen, record_property)


# ---------------------------------------------------------------- (b) arbitrary text and bytes
DLN_CHARACTERS = list('{}()[]:;,="#\\\n\r\t\f -.+0123456789eEadelmnoprstuxy_é\x00\x0c\x1c\u2028\ufeff')


def test_arbitrary_text_loads_or_fails_with_a_location(record_property):
    seen: list = []
    @budget(400)
    @given(st.text(max_size=400))
    def check(text):
        seen.append(1)
        outcome(text)
    check()
    report('test_arbitrary_text_loads_or_fails_with_a_location', seen, record_property)


def test_text_over_the_languages_characters_loads_or_fails_with_a_location(record_property):
    seen: list = []
    @budget(400)
    @given(st.text(alphabet=DLN_CHARACTERS, max_size=300))
    def check(text):
        seen.append(1)
        outcome(text)
    check()
    report('test_text_over_the_languages_characters_loads_or_fails_with_a_location', seen, record_property)


def test_arbitrary_bytes_in_a_file_give_exit_code_0_or_2(record_property, capsys):
    seen: list = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PATH

        @budget(200)
        @given(st.one_of(st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace")),
                         st.text(alphabet=DLN_CHARACTERS, max_size=200).map(str.encode)))
        def check(data):
            seen.append(1)
            path.write_bytes(data)
            code = main(["check", str(path)])
            err = capsys.readouterr().err
            assert code in (0, 2), err
            if code == 2:
                assert err.startswith(f"{path}:"), err           # file:line:col, or file: (not UTF-8 ...)
                assert "Traceback" not in err and "internal error" not in err
        check()
    report('test_arbitrary_bytes_in_a_file_give_exit_code_0_or_2', seen, record_property)


# ---------------------------------------------------------------- deep nesting
DEEP = 10_000


@pytest.mark.parametrize("text", [
    "model m\n" + "a {" * DEEP + "}" * DEEP,
    "model m\n" + "a {\n" * DEEP,
    "model m\nlayers {\n" + "dense {" * DEEP + "}" * (DEEP + 1),
    "model m\n" + "(" * DEEP,
    "model m\nx " + "(" * DEEP + ")" * DEEP,
    "model m\nx " + "[" * DEEP,
    "model m\nx = " + "[" * DEEP + "]" * DEEP,
    "model m\nx " + "{[(" * DEEP,
    "{" * DEEP,
    "}" * DEEP,
    "model m\n" + "# " + "{" * DEEP + "\n",
    "model m\n" + "\n" * DEEP + "input",
    "model m\n" + 'a "' + "\\" * DEEP,
], ids=["blocks", "unclosed_blocks", "layers_blocks", "parens", "closed_parens", "brackets",
        "list_brackets", "mixed", "braces_only", "closers_only", "comment", "newlines", "backslashes"])
def test_deep_nesting_is_a_located_error_without_recursion(text):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(min(limit, 2_000))      # far below the depth: any recursion by depth fails
    try:
        started = time.perf_counter()
        with pytest.raises(DlnError) as caught:
            dsl.load(text, PATH)
        located(caught.value)
        try:
            dsl.format_source(text, PATH)
        except DlnError as error:
            located(error)
        assert time.perf_counter() - started < 20
    finally:
        sys.setrecursionlimit(limit)


# ---------------------------------------------------------------- (c) valid random programs
@functools.cache
def image_layers_compile() -> bool:
    """Whether this version compiles conv and pooling layers (they join the strategy then)."""
    probe = ("model p\ninput x: float[1, 4, 4]\noutput y: class[2]\n"
             "layers { conv 2 size=3; maxpool size=2; avgpool size=1; flatten; dense 2 softmax }\n")
    try:
        compile_program(dsl.load(probe))
        return True
    except DlnError:
        return False


class Valid:
    """A generated program and what its output must look like."""

    def __init__(self, text: str, output_shape: tuple, image_shapes: list):
        self.text, self.output_shape, self.image_shapes = text, output_shape, image_shapes

    def __repr__(self):
        return f"Valid(text={self.text!r})"


def _real(draw, low, high, spellings=True) -> str:
    value = draw(st.floats(low, high, allow_nan=False, allow_infinity=False))
    if not spellings:
        return f"{value:g}" if f"{value:g}" not in ("0", "-0") else "0.5"
    return draw(st.sampled_from([f"{value:g}", f"{value:.3e}", repr(value)]))


@st.composite
def valid_programs(draw) -> Valid:
    image = draw(st.booleans())
    params: list[str] = []
    layers: list[str] = []
    image_shapes: list[tuple] = []
    if image:
        shape = [draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))]
        input_decl = f"float[{', '.join(map(str, shape))}]"
        if image_layers_compile():
            for _ in range(draw(st.integers(0, 3))):
                c, h, w = shape
                kind = draw(st.sampled_from(["conv", "maxpool", "avgpool"]))
                size = draw(st.integers(1, min(h, w, 4)))
                if kind == "conv":
                    filters = draw(st.integers(1, 4))
                    padding = draw(st.sampled_from(["valid", "same", 0, 1, 2])) if size % 2 else \
                        draw(st.sampled_from(["valid", 0, 1]))
                    stride = 1 if padding == "same" else draw(st.integers(1, 2))
                    p = 0 if padding == "valid" else (size // 2 if padding == "same" else padding)
                    h2, w2 = (h + 2 * p - size) // stride + 1, (w + 2 * p - size) // stride + 1
                    act = draw(st.sampled_from(["", " relu", " tanh", " sigmoid", " leaky_relu"]))
                    stride_text = f" stride={stride}" if stride != 1 or draw(st.booleans()) else ""
                    layers.append(f"conv {filters} size={size}{stride_text} padding={padding}{act}")
                    shape = [filters, h2, w2]
                else:
                    stride = draw(st.integers(1, size)) if draw(st.booleans()) else size
                    h2, w2 = (h - size) // stride + 1, (w - size) // stride + 1
                    layers.append(f"{kind} size={size}" + (f" stride={stride}" if stride != size else ""))
                    shape = [c, h2, w2]
                image_shapes.append(("N", *shape))
        layers.append("flatten")
    else:
        input_decl = f"float[{draw(st.integers(1, 12))}]"
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["dense", "dense", "dropout", "batchnorm"]))
        if kind == "dense":
            units = draw(st.integers(1, 16))
            act = draw(st.sampled_from(["", " linear", " relu", " tanh", " sigmoid", " leaky_relu",
                                        " leaky_relu(0.2)", " softmax"]))
            if not params and draw(st.booleans()):
                params.append(f"param hidden = {units}")
                layers.append(f"dense hidden{act}")
            else:
                layers.append(f"dense {units}{act}")
        elif kind == "dropout":
            layers.append(f"dropout keep_prob={_real(draw, 0.05, 1.0, spellings=False)}")
        else:
            options = draw(st.sampled_from(["", " momentum=0.8", " eps=1e-3", " momentum=0.5 eps=0.01"]))
            layers.append(f"batchnorm{options}")
    out = draw(st.sampled_from(["binary", "class", "real"]))
    if out == "binary":
        output_decl, last, output_shape = "binary", "dense 1 sigmoid", ("N",)
    elif out == "class":
        classes = draw(st.integers(2, 6))
        output_decl, last, output_shape = f"class[{classes}]", f"dense {classes} softmax", ("N", classes)
    else:
        size = draw(st.integers(1, 4))
        act = draw(st.sampled_from(["", " linear", " relu", " leaky_relu", " tanh"]))
        output_decl, last, output_shape = f"real[{size}]", f"dense {size}{act}", ("N", size)
    layers.append(last)
    named = [f"l{i}: {layer}" if draw(st.booleans()) else layer for i, layer in enumerate(layers)]

    train = [draw(st.sampled_from(["optimizer sgd lr=0.1", "optimizer momentum lr=0.05 beta=0.9",
                                   "optimizer rmsprop lr=0.01 beta2=0.99 eps=1e-7",
                                   "optimizer adam lr=1e-3 beta1=0.8", "optimizer adam"]))]
    optional = ["batch_size full", "batch_size 16", "epochs 3", "regularize l2 lambda=0.01",
                "regularize l1 lambda=0.001", "clip_norm 5.0", "lr_decay inverse rate=0.5",
                "lr_decay exponential rate=0.9", "lr_decay step every=2 factor=0.5", "seed 7",
                "early_stopping patience=3 metric=dev_error"]
    train += draw(st.lists(st.sampled_from(optional), unique_by=lambda s: s.split()[0], max_size=4))
    if draw(st.booleans()) and any(layer.startswith("l0:") for layer in named):
        train.append("freeze l0")

    sep = draw(st.sampled_from(["\n", "; "]))
    comment = draw(st.sampled_from(["", "  # a comment", " #{"]))
    block = lambda keyword, lines: (f"{keyword} {{ " + "; ".join(lines) + " }" if sep == "; "
                                    else f"{keyword} {{{comment}\n" + "\n".join(f"  {l}" for l in lines) + "\n}")
    head = [draw(st.sampled_from(["model fuzzed", "# generated\nmodel fuzzed", "model fuzzed  # name"]))]
    sections = [*params, f"input x: {input_decl}", f"output y: {output_decl}", block("layers", named)]
    if draw(st.booleans()):
        sections.append(block("train", train))
    sections = head + draw(st.permutations(sections))
    blank = draw(st.sampled_from(["\n", "\n\n"]))
    return Valid(blank.join(sections) + "\n", output_shape, image_shapes)


def test_valid_random_programs_compile_check_and_round_trip(record_property):
    seen: list = []
    @budget(150)
    @given(valid_programs())
    def check(valid):
        seen.append(1)
        text = valid.text
        program = dsl.load(text, PATH)
        formatted = dsl.format_source(text)
        assert dsl.load(formatted) == program
        assert dsl.format_source(formatted) == formatted
        compiled = compile_program(program)
        onnx.checker.check_model(compiled.model, full_check=True)
        onnx.checker.check_model(compiled.train_step, full_check=True)
        (output,) = compiled.model.graph.output
        dims = tuple(d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim)
        assert output.name == "y" and dims == valid.output_shape
        for shape, info in zip(valid.image_shapes, compiled.layers):
            assert tuple(info.output) == shape, info
        x = np.random.default_rng(0).normal(size=(3, *program.input.shape)).astype(np.float32)
        session = ort.InferenceSession(compiled.model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"x": x})[0]
        assert y.shape == (3, *valid.output_shape[1:]) and np.all(np.isfinite(y))
        if program.output.kind == "class":
            np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    check()
    report('test_valid_random_programs_compile_check_and_round_trip', seen, record_property)


def test_the_valid_strategy_draws_image_layers_once_they_compile():
    assert isinstance(image_layers_compile(), bool)


# ---------------------------------------------------------------- regressions found by fuzzing
@pytest.mark.parametrize("text,message", [
    ("model m\nparam a = " + "1" * 5000 + "\n", "a whole number of 5000 digits is too long"),
    ("model m\ninput x: float[" + "9" * 4400 + "]\n", "a whole number of 4400 digits is too long"),
    ("model m\x00", "unexpected character 'U+0000'"),
    ("model m\ninput x: float[100000000000]\noutput y: binary\nlayers { dense 1 sigmoid }\n",
     "input x: its examples (100000000000) would hold 100,000,000,000 numbers per example"),
    ("model m\ninput x: float[1, 1, 1]\noutput y: binary\nlayers { conv 1 size=1 padding=1e18; flatten; "
     "dense 1 sigmoid }\n", "conv_1: its output (N, 1, 2000000000000000001, 2000000000000000001) would hold"),
    ("model m\ninput x: float[1, 1, 1]\noutput y: binary\nlayers { conv 1 size=1 stride=1e30; flatten; "
     "dense 1 sigmoid }\n", "conv stride must be at most 9223372036854775807 (a 64-bit integer), got 1e30"),
    ("model m\ninput x: float[4]\noutput y: binary\nlayers { dense 1e12 relu; dense 1 sigmoid }\n",
     "dense_1: its weights (1000000000000, 4) would hold"),
])
def test_crashes_found_by_fuzzing_are_located_errors(text, message):
    with pytest.raises(DlnError, match=re.escape(message)) as caught:
        compile_program(dsl.load(text, PATH))
    located(caught.value)


def test_a_long_number_in_set_is_a_user_error():
    text = "model m\nparam a = 3\ninput x: float[a]\noutput y: binary\nlayers { dense 1 sigmoid }\n"
    with pytest.raises(DlnError, match="too long"):
        dsl.load(text, PATH, overrides={"a": "1" * 5000})


def test_the_caret_line_is_the_parsers_line_with_form_feeds_and_separators():
    text = "model m\x0c# \x1c comment\ninput x: float[4]\noutput y: bogus\nlayers { dense 1 sigmoid }\n"
    with pytest.raises(DlnError) as caught:
        dsl.load(text, PATH)
    rendered = caught.value.render()
    assert rendered.startswith("fuzz.dln:3:") and "output y: bogus" in rendered.splitlines()[1]


def test_fmt_counts_lines_as_the_parser_does():
    """A NEL (U+0085) inside a string is no line break: the '#' after it is no comment."""
    text = 'model m\ninput x: float[4]\noutput y: class[3]\ntrain {\nadam ("\x85#")\n}\n'
    formatted = dsl.format_source(text, PATH)
    assert formatted == 'model m\ninput x: float[4]\noutput y: class[3]\ntrain {\n  adam("\x85#")\n}\n'
    assert dsl.format_source(formatted, PATH) == formatted
