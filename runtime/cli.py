"""The `dlnc` command line: check, fmt, shapes, compile, run, search, tune, predict, info, sample, score.

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
from compiler.emit import DEFAULT_OPSET, MIN_OPSET, newest_opset, resolve_target
from compiler.lower import Normalization
from compiler.program import RECURRENT_LOWERINGS, Compiled, check_program, compile_program
from dsl import ast
from dsl.errors import DlnError

from . import report
from .data import Splits, load_splits, normalization
from .files import load_onnx, write_atomic

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


# ---------------------------------------------------------------- shared steps
def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise DlnError(f"--set {pair!r}: write --set NAME=VALUE, for example --set lr=0.01", path="dlnc")
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
                      ir_version: int | None = None, recurrent: str = "op") -> Compiled:
    norm = None
    if splits is not None and program.data is not None and program.data.normalize:
        stats = normalization(splits.train.x)
        norm = Normalization(stats.mean, stats.std)
    classes = splits.classes if splits is not None else program.output.labels
    tokens = splits is not None and program.input.kind == "tokens"       # vocabulary and window from the data
    return compile_program(program, norm, classes=tuple(classes), source_hash=source_hash(program),
                           opset=opset, ir_version=ir_version, vocab=splits.vocab if splits is not None else (),
                           steps=int(splits.train.x.shape[1]) if tokens else None, recurrent=recurrent)


# ---------------------------------------------------------------- commands
def missing_trunks(program: ast.Program) -> list[str]:
    """Pretrained files a program names that do not exist yet (made by an earlier `dlnc run`)."""
    from compiler.pretrained import resolve_path
    return [str(resolve_path(program, layer)) for layer in program.layers
            if isinstance(layer, ast.Pretrained) and not resolve_path(program, layer).exists()]


def cmd_check(args) -> int:
    program = load_program(args)
    missing = missing_trunks(program)
    if missing:                           # the language checks passed; the trunk's shapes are unknown yet
        print(f"{args.file}: ok — model {program.name} parses and type-checks; the layers after "
              f"{', '.join(missing)} are shape-checked once that file exists (train it first)")
        return EXIT_OK
    spec = check_program(program)
    params = sum(int(np.prod(p.init.shape)) for p in spec.params)
    if "tokens" in (program.input.kind, program.output.kind):      # the vocabulary comes with the data
        print(f"{args.file}: ok — model {program.name}, {len(program.layers)} layers; its size depends on the "
              f"vocabulary of its data (dlnc shapes reads it)")
        return EXIT_OK
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
    tokens = "tokens" in (program.input.kind, program.output.kind) and program.data is not None
    compiled = compile_with_data(program, load_data(program)) if tokens else compile_program(program)
    print(report.shapes_table(program, compiled.layers))
    return EXIT_OK


def cmd_compile(args) -> int:
    program = load_program(args)
    try:
        resolve_target(args.opset, args.ir_version)          # a bad --opset before any data is read
    except DlnError as exc:
        raise DlnError(exc.message, path="dlnc compile") from None
    splits = load_data(program) if program.data is not None else None
    compiled = compile_with_data(program, splits, args.opset, args.ir_version, args.recurrent)
    out = Path(args.output)
    write_atomic(out / "model.onnx", compiled.model.SerializeToString())
    write_atomic(out / "train_step.onnx", compiled.train_step.SerializeToString())
    written = [out / "model.onnx", out / "train_step.onnx"]
    if args.svg:
        from .svg import layer_graph_svg
        normalized = splits is not None and program.data is not None and program.data.normalize
        write_atomic(out / "model.svg", layer_graph_svg(program, compiled.layers, normalized).encode())
        written.append(out / "model.svg")
    print("wrote " + ", ".join(map(str, written[:-1])) + f" and {written[-1]}")
    return EXIT_OK


def cmd_run(args) -> int:
    from . import run
    from .session import resolve_device
    program = load_program(args)
    check_program(program)                         # language and shape errors before any data is read
    if args.checkpoint_interval < 0:
        raise DlnError("--checkpoint-interval must be 0 (every epoch) or a positive number of seconds",
                       path="dlnc run")
    if args.resume and args.force:
        raise DlnError("--resume continues a run and --force starts it over; pass one of them", path="dlnc run")
    out = run.choose_folder(args.output, program.name, force=args.force, resume=args.resume)
    splits = load_data(program)
    compiled = compile_with_data(program, splits)
    device, fallback = resolve_device(args.device)
    if fallback is not None:
        print(f"dlnc: warning: {fallback}", file=sys.stderr)
    summary = run.run(program, compiled, splits, out, device=device, threads=args.threads,
                      resume=args.resume, force=args.force, check_numerics=args.check_numerics,
                      checkpoint_interval=args.checkpoint_interval, quiet=args.quiet, as_json=args.json,
                      source_hash=source_hash(program))
    text = summary.pop("text")
    if program.output.kind == "tokens":                        # language models: perplexity against a unigram
        from .language import with_perplexities
        summary, text = with_perplexities(summary, text, program, splits)
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(text)
    return EXIT_OK


def cmd_predict(args) -> int:
    from .predict import predict
    return predict(args.model, args.inputs, args.output)


def cmd_info(args) -> int:
    print(report.model_info(load_onnx(args.model), args.model))
    return EXIT_OK


def cmd_sample(args) -> int:
    from .language import load_language_model, sample
    print(sample(load_language_model(args.model), args.start, args.length, args.temperature, args.seed))
    return EXIT_OK


def cmd_score(args) -> int:
    from .language import load_language_model, score_text
    print(score_text(load_language_model(args.model), args.sentence))
    return EXIT_OK


def cmd_search(args) -> int:
    from . import search as searching
    overrides = parse_overrides(args.set)
    program = dsl.load_file(args.file, overrides=overrides)
    searching.check_search(program)
    check_program(program)                         # language and shape errors before any data is read
    if args.workers < 1:
        raise DlnError(f"--workers {args.workers}: give 1 or more", path="dlnc search")
    if args.address and args.executor != "ray":
        raise DlnError("--address names a Ray cluster; add --executor ray", path="dlnc search")
    out = Path(args.output) if args.output else Path("runs") / f"{program.name}-search-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise DlnError(f"{out} is a file, not a folder — choose another -o", path="dlnc search")
    if (out / "search.csv").exists() and not args.force:
        raise DlnError(f"{out} already holds a search; pass --force to overwrite it, or choose another -o",
                       path="dlnc search")
    splits = load_data(program)
    from .trainer import named_splits
    split = program.search.metric.split("_", 1)[0]
    if split not in named_splits(splits):
        raise DlnError(f"the search's metric {program.search.metric} needs a {split} split, but the data block "
                       f"gives no {split} examples; write `split train=0.8 dev=0.2`",
                       span=program.search.span, path=program.path, source=program.source)
    chatty = not (args.quiet or args.json)
    total = program.search.trials if program.search.kind == "random" else \
        int(np.prod([len(d.args) for d in program.search.dims]))

    def on_round(number, regions):
        if chatty:
            print(f"round {number}: " + "; ".join(r.describe() for r in regions), file=sys.stderr)

    done = []

    def on_result(trial):
        done.append(trial)                         # search.csv grows as trials finish
        partial = searching.SearchResult(program, list(done), [], program.search.metric, 0.0)
        write_atomic(out / "search.csv", searching.csv_text(partial).encode())
        if chatty:
            values = ", ".join(f"{k}={searching._cell(v)}" for k, v in trial.values.items())
            outcome = (f"{program.search.metric} {trial.metric:.4f}" if trial.status == "ok"
                       else f"failed: {trial.reason[:120]}")
            print(f"  trial {trial.number} ({values}): {outcome} [{trial.train_seconds:.1f} s"
                  f"{', graph reused' if trial.reused else ''}]", file=sys.stderr)

    result = searching.run_search(program, overrides=overrides, executor=args.executor, workers=args.workers,
                                  address=args.address, threads=args.threads, splits=splits,
                                  on_result=on_result, on_round=on_round)
    write_atomic(out / "search.csv", searching.csv_text(result).encode())
    write_atomic(out / "search.png", searching.search_png(result))
    summary = searching.summary_json(result)
    best = searching.export_best(result, splits, out / "best", overrides, source_hash(program)) \
        if result.best is not None else None
    summary["best_run"] = None if best is None else {"folder": str(out / "best"), "splits": best["splits"]}
    summary["saving"] = searching.saving_text(result)
    write_atomic(out / "search.json", json.dumps(summary, indent=2, default=str).encode())
    search = program.search
    rounds = f"{search.rounds} round{'s' * (search.rounds > 1)} of {total} trials"
    lines = [f"search {program.name}: {search.kind}, {rounds}, {search.metric} (lower is better), "
             f"{len(result.trials)} trials in {result.seconds:.1f} s"]
    lines += [f"  round {i}: " + "; ".join(r.describe() for r in regions)
              for i, regions in enumerate(result.regions, start=1)]
    lines += ["", searching.table_text(result)]
    if summary["saving"]:
        lines += ["", summary["saving"]]
    if result.best is None:
        if args.json:
            print(json.dumps(summary, default=str))
        elif not args.quiet:
            print("\n".join(lines))
        raise DlnError(f"every trial failed; see the reasons above and {out / 'search.csv'}", path="dlnc search")
    b = result.best
    lines += ["", f"best: trial {b.number} ({', '.join(f'{k}={searching._cell(v)}' for k, v in b.values.items())}), "
                  f"{search.metric} {b.metric:.4f}; its run folder is {out / 'best'} (model.onnx, report.txt, "
                  f"curves.png)", f"wrote {out / 'search.csv'}, {out / 'search.json'} and {out / 'search.png'}"]
    if args.json:
        print(json.dumps(summary, default=str))
    elif not args.quiet:
        print("\n".join(lines))
    return EXIT_OK


def cmd_tune(args) -> int:
    from .control import tune
    print(tune(Path(args.run), parse_overrides(args.set)))
    return EXIT_OK


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
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to {newest_opset()} (default {DEFAULT_OPSET})")
    p.add_argument("--ir-version", type=int, default=None,
                   help="ONNX IR version (default: 8, or the oldest that carries the opset)")
    p.add_argument("--recurrent", choices=RECURRENT_LOWERINGS, default="op",
                   help="recurrent layers in model.onnx: one ONNX RNN/GRU/LSTM op each, any length (op, the "
                        "default), or unrolled into plain ops over the training window, fixed length, for tools "
                        "without those ops (unrolled)")
    p.add_argument("--svg", action="store_true", help="also write model.svg, a drawing of the layer graph")
    p = with_set(command("run", cmd_run, "train, evaluate and export"))
    p.add_argument("-o", "--output", help="run folder (default runs/<model>-<time>/)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in -o DIR from its newest complete checkpoint")
    p.add_argument("--check-numerics", action="store_true",
                   help="after every step, check that every updated parameter and optimiser slot is finite")
    p.add_argument("--checkpoint-interval", type=float, default=1.0, metavar="SECONDS",
                   help="write a checkpoint after an epoch when this long has passed since the last one "
                        "(default 1; 0: after every epoch; the last epoch always gets one)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true")
    mode.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = command("predict", cmd_predict, "predict with an exported model", file_arg=False)
    p.add_argument("model")
    p.add_argument("inputs", help=".npy or .csv of raw inputs, one example per row")
    p.add_argument("-o", "--output", help="write predictions to this .csv or .npy instead of printing")
    p = command("info", cmd_info, "inputs, outputs, opset and dlnc metadata of a model", file_arg=False)
    p.add_argument("model")
    p = command("sample", cmd_sample, "generate text with a language model", file_arg=False)
    p.add_argument("model", help="a language model (.onnx) from dlnc run")
    p.add_argument("--start", default="", help="text to continue (default: a new example)")
    p.add_argument("--length", type=int, default=40, help="most tokens to generate (default 40; <EOS> stops)")
    p.add_argument("--temperature", type=float, default=1.0, help="below 1 sharper, above 1 flatter (default 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for the same text again")
    p = command("score", cmd_score, "log-probability of a sentence, and of each token", file_arg=False)
    p.add_argument("model", help="a language model (.onnx) from dlnc run")
    p.add_argument("sentence")
    p = with_set(command("search", cmd_search, "hyperparameter search over the program's params"))
    p.add_argument("-o", "--output", help="search folder (default runs/<model>-search-<time>/)")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel (processes, or Ray tasks)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine; ray: a Ray cluster (pip install 'dlnc[ray]')")
    p.add_argument("--address", default=None, help="the Ray cluster to join (ray://HOST:10001 or HOST:6379); "
                                                  "default: a local Ray instance with --workers CPUs")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads per trial (default: the cores shared among the workers; 1 on Ray)")
    p.add_argument("--force", action="store_true", help="overwrite an existing search folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", action="store_true")
    mode.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = command("tune", cmd_tune, "change graph inputs (lr, lambda, keep_prob, betas) of a running dlnc run",
                file_arg=False)
    p.add_argument("run", help="the run folder (dlnc run -o DIR)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a graph input and its new value, applied at the next epoch (none: list them)")
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
    except BrokenPipeError:                                # `dlnc predict ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:                               # an internal error: no traceback for users
        if os.environ.get("DLNC_DEBUG"):
            traceback.print_exc()
        print(f"dlnc: internal error: {type(exc).__name__}: {exc} (set DLNC_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
