"""The `dlnc` command line: check, fmt, shapes, compile, run, predict, info.

Exit codes: 0 success, 2 a user error (language, data, files, options), 1 anything else.
A user error prints as `file:line:col: error: message` with the source line and a caret;
no Python traceback reaches the user (set DLNC_DEBUG=1 to see one for an internal error).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import numpy as np

import dsl
from compiler import __version__
from compiler.emit import DEFAULT_IR_VERSION, DEFAULT_OPSET
from compiler.lower import Normalization, check_available, unavailable_feature
from compiler.program import Compiled, check_program, compile_program, with_weights
from dsl import ast
from dsl.errors import DlnError

from . import report
from .data import Splits, load_features, load_splits, normalization
from .files import load_onnx, write_atomic

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


# ---------------------------------------------------------------- shared steps
def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise DlnError(f"--set {pair!r}: write --set NAME=VALUE, for example --set lr=0.01")
        overrides[name.strip()] = value.strip()
    return overrides


def load_program(args) -> ast.Program:
    return dsl.load_file(args.file, overrides=parse_overrides(getattr(args, "set", None) or []))


def source_hash(program: ast.Program) -> str:
    return hashlib.sha256((program.source or "").encode()).hexdigest()


def load_data(program: ast.Program) -> Splits:
    if program.data is None:
        raise DlnError("this command needs a data block; write for example "
                       "`data { source \"digits\"; split train=0.8 dev=0.1 test=0.1 }`",
                       span=program.span, path=program.path, source=program.source)
    base = Path(program.path).parent if program.path else Path.cwd()
    try:
        return load_splits(program.data, program.input, program.output, base, program.train.seed,
                           program_path=program.path)
    except DlnError as exc:
        raise exc.located(program.path, program.source) from None


def compile_with_data(program: ast.Program, splits: Splits | None, opset: int = DEFAULT_OPSET,
                      ir_version: int = DEFAULT_IR_VERSION) -> Compiled:
    norm = None
    if splits is not None and program.data is not None and program.data.normalize:
        stats = normalization(splits.train.x)
        norm = Normalization(stats.mean, stats.std)
    classes = splits.classes if splits is not None else program.output.labels
    return compile_program(program, norm, classes=tuple(classes), source_hash=source_hash(program),
                           opset=opset, ir_version=ir_version)


# ---------------------------------------------------------------- commands
def cmd_check(args) -> int:
    program = load_program(args)
    later = unavailable_feature(program)
    if later is not None:
        print(f"{args.file}: ok — model {program.name} parses and type-checks; compiling it needs a later "
              f"version of dlnc ({later[0]})")
        return EXIT_OK
    compiled = check_program(program)
    params = sum(int(np.prod(p.init.shape)) for p in compiled.spec.params)
    print(f"{args.file}: ok — model {program.name}, {len(program.layers)} layers, {params} parameters")
    return EXIT_OK


def cmd_fmt(args) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DlnError(f"cannot read the file: {exc}", path=str(path)) from None
    sys.stdout.write(dsl.format_source(text, str(path)))
    return EXIT_OK


def cmd_shapes(args) -> int:
    program = load_program(args)
    print(report.shapes_table(program, compile_program(program).layers))
    return EXIT_OK


def cmd_compile(args) -> int:
    program = load_program(args)
    check_available(program)
    splits = load_data(program) if program.data is not None else None
    compiled = compile_with_data(program, splits, args.opset, args.ir_version)
    out = Path(args.output)
    write_atomic(out / "model.onnx", compiled.model.SerializeToString())
    write_atomic(out / "train_step.onnx", compiled.train_step.SerializeToString())
    print(f"wrote {out / 'model.onnx'} and {out / 'train_step.onnx'}")
    return EXIT_OK


def run_folder(args, program: ast.Program) -> Path:
    if args.output:
        out = Path(args.output)
        if (out / "model.onnx").exists() and not args.force:
            raise DlnError(f"{out} already holds a run; pass --force to overwrite it, or choose another -o")
        return out
    return Path("runs") / f"{program.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args) -> int:
    from .trainer import train
    program = load_program(args)
    check_available(program)
    compile_program(program)                       # language and shape errors before any data is read
    splits = load_data(program)
    compiled = compile_with_data(program, splits)
    out = run_folder(args, program)
    bar = report.progress(program.train.epochs, enabled=not (args.quiet or args.json))
    lines: list[str] = []

    def on_epoch(record):
        lines.append(json.dumps(report.epoch_json(record)))
        bar.update(record)

    try:
        result = train(compiled, splits, device=args.device, threads=args.threads, on_epoch=on_epoch)
    finally:
        bar.close()
    trained = with_weights(compiled.model, result.weights)
    write_atomic(out / "train_step.onnx", compiled.train_step.SerializeToString())
    write_atomic(out / "metrics.jsonl", ("\n".join(lines) + "\n").encode())
    write_atomic(out / "config.json", json.dumps(report.config_json(program, source_hash(program)), indent=2).encode())
    write_atomic(out / "model.onnx", trained.SerializeToString())
    summary = report.summary_json(program, result, out)
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(report.summary_text(program, result, out))
    return EXIT_OK


def cmd_predict(args) -> int:
    from .predict import predict
    return predict(args.model, args.inputs, args.output)


def cmd_info(args) -> int:
    print(report.model_info(load_onnx(args.model), args.model))
    return EXIT_OK


def cmd_not_yet(args) -> int:
    raise DlnError(f"`dlnc {args.command}` is not available yet in this version of dlnc "
                   f"(it comes with the {NOT_YET[args.command]}); dlnc run trains a single model")


NOT_YET = {"search": "hyperparameter-search work", "sample": "sequence-model work", "score": "sequence-model work"}


# ---------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlnc", description="Compile and train .dln deep-learning models on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"dlnc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text, file_arg=True):
        p = sub.add_parser(name, help=help_text)
        if file_arg:
            p.add_argument("file", help="the .dln model")
        p.set_defaults(fn=fn)
        return p

    def with_set(p):
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
        return p

    with_set(command("check", cmd_check, "parse and type-check"))
    command("fmt", cmd_fmt, "print the canonical form")
    with_set(command("shapes", cmd_shapes, "per layer: W, b, Z/A shapes, parameters, FLOPs"))
    p = with_set(command("compile", cmd_compile, "write model.onnx and train_step.onnx"))
    p.add_argument("-o", "--output", default="out", help="output folder (default out/)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--ir-version", type=int, default=DEFAULT_IR_VERSION)
    p = with_set(command("run", cmd_run, "train, evaluate and export"))
    p.add_argument("-o", "--output", help="run folder (default runs/<model>-<time>/)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true")
    mode.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = command("predict", cmd_predict, "predict with an exported model", file_arg=False)
    p.add_argument("model")
    p.add_argument("inputs", help=".npy or .csv of raw inputs, one example per row")
    p.add_argument("-o", "--output", help="write predictions to this .csv or .npy instead of printing")
    p = command("info", cmd_info, "inputs, outputs, opset and dlnc metadata of a model", file_arg=False)
    p.add_argument("model")
    for name in NOT_YET:
        p = sub.add_parser(name, help=f"not available yet")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=cmd_not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except DlnError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("dlnc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:                               # an internal error: no traceback for users
        if os.environ.get("DLNC_DEBUG"):
            traceback.print_exc()
        print(f"dlnc: internal error: {type(exc).__name__}: {exc} (set DLNC_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
