"""The front end: golden programs load into the expected AST, fmt round-trips, params and
overrides substitute, and the lexical rules of the reference hold."""
from __future__ import annotations

import pathlib
import re

import pytest

import dsl
from compiler.program import compile_program
from dsl import DlnError, ast
from dsl.syntax import grammar_text

PROGRAMS = pathlib.Path(__file__).parent / "golden" / "programs"
PROGRAM_FILES = sorted(PROGRAMS.glob("*.dln"))
# the examples of the language reference, copied verbatim
REFERENCE = ["cancer_logistic", "moons_shallow", "digits_deep", "digits_cnn", "digits_transfer",
             "names_lm", "cats_mismatch"]

MINIMAL = """model m
input x: float[2]
output y: binary
layers { dense 1 sigmoid }
"""


def program(name: str, **overrides: str) -> ast.Program:
    return dsl.load_file(str(PROGRAMS / f"{name}.dln"), overrides or None)


def test_reference_examples_are_all_there():
    assert {p.stem for p in PROGRAM_FILES} >= set(REFERENCE)


@pytest.mark.parametrize("path", PROGRAM_FILES, ids=lambda p: p.stem)
def test_program_loads(path):
    prog = dsl.load_file(str(path))
    assert prog.path == str(path) and prog.source == path.read_text(encoding="utf-8")
    assert prog.layers and prog.input and prog.output


@pytest.mark.parametrize("path", PROGRAM_FILES, ids=lambda p: p.stem)
def test_fmt_round_trips(path):
    text = path.read_text(encoding="utf-8")
    formatted = dsl.format_source(text)
    assert dsl.load(formatted) == dsl.load(text)
    assert dsl.format_source(formatted) == formatted
    assert formatted.count("#") == text.count("#")          # comments are kept


# ---------------------------------------------------------------- golden .dln -> AST
def test_logistic_regression():
    prog = program("cancer_logistic")
    assert prog.name == "cancer_logistic"
    assert prog.data.source == ast.Source("builtin", "breast_cancer")
    assert prog.data.split == ast.Split(0.8, 0.1, 0.1) and prog.data.normalize
    assert prog.input == ast.InputDecl("x", "float", (30,))
    assert prog.output == ast.OutputDecl("y", "binary", 1)
    assert prog.layers == (ast.Dense("dense_1", None, units=1,
                                     activation=ast.Activation("sigmoid")),)
    assert prog.train.optimizer == ast.Optimizer("sgd", lr=0.5)
    assert prog.train.batch_size == "full" and prog.train.epochs == 300


def test_deep_network_substitutes_params():
    prog = program("digits_deep")
    assert [p.name for p in prog.params] == ["hidden", "keep"]
    dense, bn, drop, leaky, out = prog.layers
    assert dense.units == 64 and dense.activation.kind == "relu"
    assert bn == ast.BatchNorm("batchnorm_2", None, momentum=0.9, eps=1e-5)
    assert drop.keep_prob == 0.8 and drop.name == "dropout_3"
    assert leaky.activation == ast.Activation("leaky_relu", 0.01)
    assert out.units == 10 and out.activation.kind == "softmax"
    train = prog.train
    assert train.lr_decay == ast.LrDecay("inverse", rate=0.05)
    assert train.regularize == ast.Regularize("l2", 0.001)
    assert train.early_stopping == ast.EarlyStopping(8, "dev_error")
    assert train.seed == 1 and train.loss is None
    assert dense.spans["units"] == dsl.Span(8, 9, 8, 15)     # points at the use of `hidden`


def test_cnn():
    prog = program("digits_cnn")
    assert prog.input.shape == (1, 8, 8)
    conv = prog.layers[0]
    assert conv == ast.Conv("conv_1", None, filters=8, size=3, stride=1, padding="same",
                            activation=ast.Activation("relu"))
    assert prog.layers[1] == ast.Pool("maxpool_2", None, kind="max", size=2, stride=2)
    assert prog.layers[3] == ast.Pool("avgpool_4", None, kind="avg", size=2, stride=2)
    assert prog.layers[4].name == "flatten_5"
    assert prog.data.augment == ast.Augment(translate=1)
    assert prog.train.optimizer == ast.Optimizer("momentum", lr=0.05, beta=0.9)


def test_transfer():
    trunk, dense = program("digits_transfer").layers
    assert trunk == ast.Pretrained("trunk", None, path="runs/digits_cnn/model.onnx",
                                   until="flatten_5", trainable=False)
    assert dense.name == "dense_2"


def test_language_model():
    prog = program("names_lm")
    assert prog.data.source == ast.Source("text", "names.txt", level="char")
    assert prog.data.sequence_length == 24
    assert prog.input == ast.InputDecl("x", "tokens", ())
    assert prog.output == ast.OutputDecl("y", "tokens", 0, per_step=True)
    assert prog.layers[1] == ast.Recurrent("gru_2", None, cell="gru", units=128)
    assert prog.layers[2].units == "vocab"
    assert prog.train.clip_norm == 5.0


def test_two_distributions():
    data = program("cats_mismatch").data
    assert data.source.kind == "npz" and data.dev_source == ast.Source("npz", "phone_images.npz")
    assert data.train_dev == 0.05 and data.human_error == 0.01
    assert data.split == ast.Split()                        # the default 0.8 / 0.1 / 0.1


def test_every_layer_kind():
    layers = program("layers_all").layers
    assert [type(l).__name__ for l in layers] == ["Embed", "OneHot", "Recurrent", "Recurrent",
                                                  "Recurrent", "Recurrent", "Last", "Dense"]
    assert layers[2] == ast.Recurrent("rnn_3", None, cell="rnn", units=16, activation="relu")
    assert layers[4] == ast.Recurrent("lstm_5", None, cell="lstm", units=10, last=True)
    assert layers[5].activation == "tanh" and layers[5].last    # `act` is a param
    images = program("images")
    conv, valid = images.layers[:2]
    assert (conv.stride, conv.padding, conv.activation.kind) == (2, 2, "leaky_relu")
    assert valid.padding == 0 and valid.activation.kind == "linear"
    assert images.layers[2] == ast.Pool("maxpool_3", None, kind="max", size=2, stride=1)
    assert images.layers[5] == ast.Pretrained("head", None, path="head.onnx", until="out",
                                              trainable=True)
    assert images.data.source.kind == "images" and images.data.test_source.kind == "images"
    assert images.data.split == ast.Split(0.9, 0.1, 0.0)
    assert images.output == ast.OutputDecl("y", "real", 2)
    assert images.train.lr_decay == ast.LrDecay("exponential", rate=0.95)
    assert images.train.regularize == ast.Regularize("l1", 0.0)


def test_full_train_block():
    prog = program("train_full")
    assert prog.data.source == ast.Source("csv", "table.csv", label="species")
    assert prog.output.labels == ("setosa", "versicolor", "virginica") and prog.output.size == 3
    assert prog.layers[0].activation == ast.Activation("leaky_relu", 0.2)
    assert prog.train.freeze == ("trunk", "batchnorm_2")
    assert prog.train.loss == "cross_entropy"
    assert prog.data.augment == ast.Augment("horizontal", 2, 1)


def test_search():
    search = program("search_random").search
    assert (search.kind, search.trials, search.rounds, search.metric) == \
        ("random", 20, 2, "dev_error")
    assert [(d.name, d.dist, d.args) for d in search.dims] == [
        ("lr", "log_uniform", (1e-4, 1e-1)), ("hidden", "choice", (32, 64, 128)),
        ("keep", "uniform", (0.5, 1.0)), ("batch", "int_uniform", (16, 128))]
    grid = program("search_grid").search
    assert grid.kind == "grid" and grid.dims[0] == ast.SearchDim("lr", "grid", (0.1, 0.01, 0.001),
                                                                 None)


def test_defaults():
    prog = dsl.load(MINIMAL)
    assert prog.data is None and prog.search is None
    assert prog.train == ast.Train()
    assert prog.train.optimizer == ast.Optimizer("adam", lr=0.001)
    assert (prog.train.batch_size, prog.train.epochs, prog.train.seed) == (32, 10, 0)


# ---------------------------------------------------------------- params and overrides
def test_overrides_replace_params_everywhere():
    prog = program("search_random", lr="0.01", hidden="128", batch="16")
    assert prog.param("lr").value == 0.01 and prog.param("hidden").value == 128
    assert prog.train.optimizer.lr == 0.01 and prog.train.batch_size == 16
    assert prog.layers[0].units == 128


def test_word_params():
    text = MINIMAL.replace("sigmoid", "act") + "param act = sigmoid\n"
    assert dsl.load(text).layers[0].activation.kind == "sigmoid"
    assert dsl.load(text, overrides={"act": "tanh"}).layers[0].activation.kind == "tanh"


def test_override_errors():
    with pytest.raises(DlnError, match="unknown param 'hiden'.*did you mean 'hidden'"):
        program("digits_deep", hiden="3")
    with pytest.raises(DlnError, match="param 'hidden' takes a number"):
        program("digits_deep", hidden="lots")


def test_undefined_param():
    with pytest.raises(DlnError, match="undefined param 'hiden' — did you mean 'hidden'"):
        dsl.load(MINIMAL.replace("dense 1", "dense hiden") + "param hidden = 1\n")


# ---------------------------------------------------------------- lexical rules
def test_one_line_blocks_comments_and_semicolons():
    text = ("# a comment\n\nmodel m   # trailing\n;;\ninput x: float[2]; output y: binary\n"
            "layers { dense 4 tanh; dense 1 sigmoid }  # two layers\n"
            "train { epochs 5; batch_size 32 }\n\n\n")
    prog = dsl.load(text)
    assert len(prog.layers) == 2 and prog.train.epochs == 5 and prog.train.batch_size == 32


def test_block_on_many_lines_with_blank_lines():
    text = "model m\n\ninput x: float[2]\noutput y: binary\nlayers {\n\n  dense 1 sigmoid\n\n}\n"
    assert dsl.load(text).layers[0].units == 1


@pytest.mark.parametrize("text,value", [("64", 64), ("0.01", 0.01), ("1e-4", 1e-4),
                                        ("-3", -3), (".5", 0.5), ("2E3", 2000.0)])
def test_numbers(text, value):
    syntax = dsl.parse_syntax(f"seed {text}")
    number = syntax.statements[0].items[0]
    assert number.value == value and type(number.value) is type(value)


def test_options_with_spaces_and_strings_with_escapes():
    stmt = dsl.parse_syntax('source "a \\"b\\".npz" label = c').statements[0]
    assert stmt.items[0].value == 'a "b".npz' and stmt.items[1].key == "label"
    assert dsl.format_source('source "a \\"b\\".npz" label = c') == \
        'source "a \\"b\\".npz" label=c\n'


def test_spans_point_at_words():
    stmt = dsl.parse_syntax("layers {\n  trunk: dense 64 relu\n}").statements[0]
    dense = stmt.block.statements[0]
    assert dense.label.name == "trunk" and dense.label_first
    assert dense.keyword.span == dsl.Span(2, 10, 2, 15)
    assert dense.items[1].span == dsl.Span(2, 19, 2, 23)


def test_crlf_and_bom():
    text = "\ufeff" + MINIMAL.replace("\n", "\r\n")
    assert dsl.load(text) == dsl.load(MINIMAL)


def test_fmt_canonical_form():
    text = "model m # the model\nparam  h=3\n\n\n\nlayers{dense h relu;dense 1}\n# end\n"
    assert dsl.format_source(text) == ("model m  # the model\nparam h = 3\n\nlayers {\n"
                                       "  dense h relu\n  dense 1\n}\n# end\n")


# ---------------------------------------------------------------- the parser itself
def test_grammar_is_package_data_and_lalr():
    assert "start:" in grammar_text()
    from dsl.syntax import _parser
    assert _parser().options.parser == "lalr"


def test_lark_types_do_not_escape():
    import lark
    syntax = dsl.parse_syntax(MINIMAL + "train { optimizer adam lr=0.1; freeze dense_1 }\n")
    stack = list(syntax.statements)
    while stack:                                            # every node is ours
        node = stack.pop()
        assert not isinstance(node, (lark.Tree, lark.Token))
        if hasattr(node, "__dataclass_fields__"):
            stack.extend(getattr(node, f) for f in node.__dataclass_fields__)
        elif isinstance(node, tuple):
            stack.extend(node)
    with pytest.raises(DlnError):
        dsl.parse_syntax("model {")


def test_load_file_errors(tmp_path):
    with pytest.raises(DlnError, match="no such file") as e:
        dsl.load_file(str(tmp_path / "missing.dln"))
    assert e.value.render().startswith(str(tmp_path / "missing.dln"))
    bad = tmp_path / "latin1.dln"
    bad.write_bytes("model caf\xe9\n".encode("latin-1"))
    with pytest.raises(DlnError, match="not UTF-8") as e:
        dsl.load_file(str(bad))
    assert e.value.path == str(bad)


def test_errors_carry_path_and_source():
    with pytest.raises(DlnError) as e:
        dsl.load(MINIMAL.replace("sigmoid", "sigmod"), path="m.dln")
    assert e.value.path == "m.dln" and e.value.source.startswith("model m")
    assert e.value.render().splitlines()[0] == \
        "m.dln:4:18: error: unknown activation 'sigmod' — did you mean 'sigmoid'?"


ERROR_FILES = sorted((PROGRAMS.parent / "errors").glob("*.dln"))


@pytest.mark.parametrize("path", ERROR_FILES, ids=lambda p: p.stem)
def test_fmt_keeps_the_error(path):
    """fmt of a program that parses but fails to load fails the same way, and is stable."""
    text = path.read_text(encoding="utf-8")
    try:
        formatted = dsl.format_source(text)
    except DlnError:
        return                                              # a syntax error: nothing to format
    assert dsl.format_source(formatted) == formatted
    overrides = dict(line.removeprefix("# --set ").split("=", 1)
                     for line in text.splitlines() if line.startswith("# --set "))
    messages = []
    for source in (text, formatted):
        with pytest.raises(DlnError) as e:
            compile_program(dsl.load(source, overrides=overrides or None))
        messages.append(re.sub(r"line \d+", "line N", e.value.message))
    assert messages[0] == messages[1]
