"""`dlnc compile --svg`: a drawing of the layer graph, with the shapes on the edges.

Hand-written SVG (no graphviz): one column of boxes from the input to the output, each box a
layer with its name, what it computes and its parameter shapes; each arrow carries the
batch-first shape of the tensor that flows along it, named as in the exported ONNX model
(`dense_1`, `batchnorm_2`). The same input always gives the same bytes.
"""
from __future__ import annotations

from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np

from compiler.lower import LayerInfo
from dsl import ast

WIDTH = 520
BOX_W, BOX_H, GAP, TOP = 400, 54, 46, 52
X0 = (WIDTH - BOX_W) // 2
FILL = {"input": "#e8f1fb", "output": "#e9f7ec", "normalize": "#f4f4f4", "dense": "#fff4dd",
        "conv": "#fde8e8", "maxpool": "#efe8fd", "avgpool": "#efe8fd", "pool": "#efe8fd",
        "flatten": "#f4f4f4", "dropout": "#f4f4f4", "batchnorm": "#e6f6f6", "embed": "#eef6e0",
        "one_hot": "#eef6e0", "rnn": "#fdeede", "gru": "#fdeede", "lstm": "#fdeede", "last": "#f4f4f4"}


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _activation(act: ast.Activation) -> str:
    if act.kind == "leaky_relu" and act.alpha != 0.01:
        return f"leaky_relu({act.alpha:g})"
    return act.kind


def describe_layer(layer: ast.Layer | None, info: LayerInfo) -> str:
    """What the layer computes, as the .dln statement reads."""
    if isinstance(layer, ast.Dense):
        return f"dense {layer.units} {_activation(layer.activation)}"
    if isinstance(layer, ast.Conv):
        pad = "same" if layer.padding == "same" else f"padding={layer.padding}"
        return (f"conv {layer.filters} size={layer.size} stride={layer.stride} {pad} "
                f"{_activation(layer.activation)}")
    if isinstance(layer, ast.Pool):
        return f"{layer.kind}pool size={layer.size} stride={layer.stride}"
    if isinstance(layer, ast.Dropout):
        return f"dropout keep_prob={layer.keep_prob:g} (identity at inference)"
    if isinstance(layer, ast.BatchNorm):
        return f"batchnorm momentum={layer.momentum:g} eps={layer.eps:g}"
    if isinstance(layer, ast.Embed):
        return f"embed {layer.dim}"
    if isinstance(layer, ast.Recurrent):
        act = f" {layer.activation}" if layer.cell == "rnn" else ""
        return f"{layer.cell} {layer.units}{act}" + (" (last step)" if layer.last else " (every step)")
    if isinstance(layer, ast.Pretrained):
        return f'pretrained "{layer.path}"' + (f" until {layer.until}" if layer.until else "")
    return info.kind


def _params(info: LayerInfo) -> str:
    if not info.params:
        return "no parameters"
    count = sum(int(np.prod(shape)) for _, shape in info.params)
    shapes = ", ".join(f"{name.split('.')[-1]} {_dims(shape)}" for name, shape in info.params)
    return f"{shapes} · {count:,} parameters"


def _box(y: int, kind: str, title: str, lines: Sequence[str], tooltip: str) -> list[str]:
    fill = FILL.get(kind, "#ffffff")
    out = [f'<g class="node {escape(kind)}"><title>{escape(tooltip)}</title>',
           f'<rect x="{X0}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" stroke="#555"/>',
           f'<text x="{WIDTH // 2}" y="{y + 20}" class="title">{escape(title)}</text>']
    for i, line in enumerate(lines):
        out.append(f'<text x="{WIDTH // 2}" y="{y + 36 + 13 * i}" class="detail">{escape(line)}</text>')
    out.append("</g>")
    return out


def _edge(y: int, tensor: str, shape) -> list[str]:
    """An arrow from the box above (ending at y) to the box below, labelled `tensor (shape)`."""
    x, y1, y2 = WIDTH // 2, y, y + GAP
    return [f'<g class="edge"><title>{escape(tensor)} {escape(_dims(shape))}</title>',
            f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y2 - 7}" stroke="#555" stroke-width="1.5"/>',
            f'<path d="M {x - 5} {y2 - 8} L {x + 5} {y2 - 8} L {x} {y2} Z" fill="#555"/>',
            f'<text x="{x + 10}" y="{y1 + GAP // 2 + 4}" class="shape">{escape(_dims(shape))}</text>',
            f'<text x="{x - 10}" y="{y1 + GAP // 2 + 4}" class="tensor">{escape(tensor)}</text>',
            "</g>"]


def layer_graph_svg(program: ast.Program, layers: Sequence[LayerInfo], normalized: bool = False) -> str:
    """The SVG text of the model's layer graph: input, [normalize], the layers, the output."""
    by_name = {layer.name: layer for layer in program.layers}
    inp, out = program.input, program.output
    shape = ("N", "T") if inp.kind == "tokens" else ("N", *inp.shape)
    parts: list[str] = []
    y = TOP
    kind = f"{inp.kind}[{', '.join(map(str, inp.shape))}]" if inp.shape else inp.kind
    about = "token ids, batch-first" if inp.kind == "tokens" else "raw examples, batch-first"
    parts += _box(y, "input", f"input {inp.name}: {kind}", [about], f"input {inp.name}")
    tensor = inp.name
    if normalized:
        parts += _edge(y + BOX_H, tensor, shape)
        y += BOX_H + GAP
        parts += _box(y, "normalize", "normalize", ["(x − μ) / σ, μ and σ from the train split"], "normalize")
        tensor = "normalize"
    for info in layers:
        parts += _edge(y + BOX_H, tensor, shape)
        y += BOX_H + GAP
        parts += _box(y, info.kind, f"{info.name}", [describe_layer(by_name.get(info.name), info), _params(info)],
                      f"layer {info.name} ({info.kind})")
        tensor, shape = info.name, info.output
    final = ("N",) if out.kind == "binary" else shape
    what = {"binary": "probability of class 1", "class": "class probabilities",
            "real": "predicted values", "tokens": "next-token probabilities"}.get(out.kind, "outputs")
    size = f"[{out.size}]" if out.kind in ("class", "real") else " per_step" if out.per_step else ""
    parts += _edge(y + BOX_H, tensor, shape)
    y += BOX_H + GAP
    parts += _box(y, "output", f"output {out.name}: {out.kind}{size}", [f"{what} {_dims(final)}"],
                  f"output {out.name}")
    height = y + BOX_H + 24
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">',
            f"<title>{escape(program.name)}: layer graph</title>",
            "<style>.title{font-size:14px;font-weight:bold;text-anchor:middle}"
            ".detail{font-size:11px;fill:#333;text-anchor:middle}"
            ".shape{font-size:11px;fill:#1f5fa8;font-family:monospace}"
            ".tensor{font-size:11px;fill:#777;text-anchor:end;font-family:monospace}</style>",
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
            f'<text x="{WIDTH // 2}" y="30" class="title" style="font-size:16px">model {escape(program.name)}</text>']
    return "\n".join(head + parts + ["</svg>"]) + "\n"
