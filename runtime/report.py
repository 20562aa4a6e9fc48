"""What dlnc prints: the shapes table, the progress bar, run summaries and model info."""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from compiler.lower import LayerInfo
from dsl import ast


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _course_shape(role: str, shape: tuple) -> str:
    """The notes' column-per-example layout: W[l] (n[l], n[l−1]), b[l] (n[l], 1)."""
    if role == "b" or len(shape) == 1:
        return f"({shape[0]}, 1)"
    return _dims(shape)


def shapes_table(program: ast.Program, layers: Sequence[LayerInfo]) -> str:
    """Per layer: W[l], b[l] and Z[l]/A[l] in the course's layout and in ONNX's, parameters, FLOPs."""
    header = ("l", "layer", "params: course (n[l], n[l-1])", "params: ONNX", "Z/A course", "Z/A ONNX",
              "parameters", "FLOPs/example")
    features = ("T",) if program.input.kind == "tokens" else program.input.shape      # token ids: (N, T)
    rows = [("0", f"input {program.input.name}", "", "", f"({', '.join(map(str, features))}, m)",
             _dims(("N", *features)), "", "")]
    total_params = total_flops = 0
    for index, info in enumerate(layers, start=1):
        count = sum(int(np.prod(shape)) for _, shape in info.params)
        total_params += count
        total_flops += info.flops
        course = ", ".join(f"{name.split('.')[-1]}[{index}] {_course_shape(name.split('.')[-1], s)}"
                           for name, s in info.params)
        onnx_layout = ", ".join(f"{name} {_dims(s)}" for name, s in info.params)
        features = info.output[1:]
        rows.append((str(index), f"{info.name} ({info.kind})", course, onnx_layout,
                     f"({', '.join(map(str, features))}, m)", _dims(info.output), f"{count:,}", f"{info.flops:,}"))
    rows.append(("", "total", "", "", "", "", f"{total_params:,}", f"{total_flops:,}"))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    title = (f"model {program.name}: course layout is column-per-example (m examples); "
             f"ONNX layout is batch-first (N examples); FLOPs count a multiply-add as 2")
    return "\n".join([title, line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


class progress:
    """A tqdm bar over epochs that shows the cost and the dev error. It appears with the first
    finished epoch, so an error raised before training leaves stderr to the error alone."""

    def __init__(self, epochs: int, enabled: bool, initial: int = 0):
        self.bar = None
        self.enabled, self.epochs, self.initial = enabled, epochs, initial

    def update(self, record) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=self.epochs, initial=self.initial, unit="epoch", file=sys.stderr,
                            dynamic_ncols=True, leave=False)
        shown = {"loss": f"{record.cost:.4f}"}
        if "dev" in record.splits:
            shown["dev_error"] = f"{record.splits['dev'].error:.4f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_json(record) -> dict:
    """One line of metrics.jsonl; `changes`: the graph inputs `dlnc tune` changed before this epoch."""
    changes = getattr(record, "changes", None)
    return {"epoch": record.epoch, "lr": record.lr, "cost": record.cost,
            **{f"{name}_loss": m.loss for name, m in record.splits.items()},
            **{f"{name}_error": m.error for name, m in record.splits.items()},
            **({"changes": dict(changes)} if changes else {})}


def config_json(program: ast.Program, source_hash: str, *, compiled=None, data_hash: str | None = None) -> dict:
    """The resolved hyperparameters (params after --set, the train and data blocks with their
    defaults, the loss and the training graph's scalar inputs) and the hashes of the program
    text (`source_sha256`), of this configuration (`config_sha256`) and of the data."""
    def plain(value):
        return _without_spans(json.loads(json.dumps(
            value, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))))
    config = {"model": program.name, "source_sha256": source_hash,
              "params": {p.name: p.value for p in program.params},
              "train": plain(asdict(program.train)), "data": plain(asdict(program.data)) if program.data else None,
              "input": plain(asdict(program.input)), "output": plain(asdict(program.output))}
    if compiled is not None:
        config["loss"] = compiled.loss
        config["graph_inputs"] = {name: float(v) for name, v in compiled.spec.hyper.items()}
    config["config_sha256"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    if data_hash is not None:
        config["data_sha256"] = data_hash
    return config


def _without_spans(value):
    """A JSON value without the AST's source positions (`span`, `spans`)."""
    if isinstance(value, dict):
        return {k: _without_spans(v) for k, v in value.items() if k not in ("span", "spans")}
    if isinstance(value, list):
        return [_without_spans(v) for v in value]
    return value


def summary_json(program: ast.Program, result, out: Path) -> dict:
    return {"model": program.name, "run_folder": str(out), "epochs": len(result.history),
            "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
            "splits": {name: {"loss": m.loss, "error": m.error, "examples": m.size} for name, m in result.final.items()}}


def summary_text(program: ast.Program, result, out: Path) -> str:
    real = program.output.kind == "real"
    header = ("split", "examples", "loss", "MSE" if real else "accuracy", "" if real else "error")
    rows = [(name, str(m.size), f"{m.loss:.4f}", f"{m.error:.4f}" if real else f"{1 - m.error:.2%}",
             "" if real else f"{m.error:.2%}") for name, m in result.final.items()]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    stop = (f", stopped early; best weights from epoch {result.best_epoch} restored" if result.stopped_early
            else f", best weights from epoch {result.best_epoch} restored" if program.train.early_stopping else "")
    resumed = f" (resumed after epoch {result.resumed_from})" if getattr(result, "resumed_from", 0) else ""
    return "\n".join([f"model {program.name}: trained {len(result.history)} epochs{resumed}{stop}",
                      line(header), *map(line, rows)])


def _value_type(value: onnx.ValueInfoProto) -> str:
    t = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
    return f"{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)} [{', '.join(dims)}]"


def model_info(model: onnx.ModelProto, path: str) -> str:
    initializers = {t.name for t in model.graph.initializer}
    lines = [f"{path}: ONNX IR version {model.ir_version}, opsets "
             + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import),
             f"producer: {model.producer_name} {model.producer_version}".rstrip()]
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    lines.append(f"graph: {model.graph.name}, {len(model.graph.node)} nodes, {len(initializers)} initializers "
                 f"({weights:,} numbers)" + (f" — {model.graph.doc_string}" if model.graph.doc_string else ""))
    lines.append("inputs:")
    lines += [f"  {i.name}: {_value_type(i)}" for i in model.graph.input if i.name not in initializers]
    lines += ["outputs:"] + [f"  {o.name}: {_value_type(o)}" for o in model.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("dlnc.recurrent") == "unrolled":
        lines.append(f"recurrent layers: unrolled over {meta.get('dlnc.sequence_length', '?')} steps "
                     f"(plain ops, no RNN/GRU/LSTM op); the input length is fixed")
    if model.metadata_props:
        lines += ["metadata:"] + [f"  {p.key}: {p.value}" for p in model.metadata_props]
    return "\n".join(lines)
