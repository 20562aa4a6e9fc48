"""`dlnc predict`: run an exported model on raw inputs from a .npy or .csv file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

from dsl.errors import DlnError

from .data import load_features
from .files import load_onnx, write_atomic
from .metrics import predictions
from .session import make_session


def _declared_shape(model) -> tuple:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value else None for d in dims[1:])


def _reshape(x: np.ndarray, shape: tuple, path: str) -> np.ndarray:
    want = int(np.prod(shape))
    got = int(np.prod(x.shape[1:]))
    if got != want:
        raise DlnError(f"each example has {got} values but the model takes {want} "
                       f"(shape {tuple(shape)}); give one example per row with {want} columns", path=path)
    return x.reshape((len(x), *shape)).astype(np.float32)


def _token_ids(x: np.ndarray, path: str) -> np.ndarray:
    """Sequences of token ids, one per row (n, T), any T: whole numbers ≥ 0, as int64."""
    if x.ndim != 2 or not np.all(np.isfinite(x)) or np.any(x != np.round(x)) or np.any(x < 0):
        raise DlnError("the model reads token ids: give one sequence per row, whole numbers ≥ 0", path=path)
    return x.astype(np.int64)


def predict(model_path: str, inputs_path: str, output: str | None) -> int:
    model = load_onnx(model_path)
    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get("dlnc.output_kind", "real")
    classes = json.loads(meta.get("dlnc.classes", "[]"))
    if kind == "tokens":
        raise DlnError("this is a language model (a token at every step): use `dlnc sample` or `dlnc score`",
                       path=model_path)
    if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64:    # a tokens input
        x = _token_ids(load_features(inputs_path), inputs_path)
    else:
        x = _reshape(load_features(inputs_path), _declared_shape(model), inputs_path)
    session = make_session(model.SerializeToString())
    p = session.run(None, {session.get_inputs()[0].name: x})[0]
    labels = predictions(kind, p)
    if output:
        out = Path(output)
        if out.suffix == ".npy":
            import io
            buffer = io.BytesIO()
            np.save(buffer, p, allow_pickle=False)
            write_atomic(out, buffer.getvalue())
        else:
            write_atomic(out, _csv(kind, p, labels, classes).encode())
        print(f"wrote {len(x)} predictions to {out}", file=sys.stderr)
    else:
        sys.stdout.write(_csv(kind, p, labels, classes))
    return 0


def _csv(kind: str, p: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    """One row per example: the prediction, then the probabilities (or values)."""
    if kind == "class":
        names = classes if len(classes) == p.shape[1] else [str(i) for i in range(p.shape[1])]
        rows = [",".join([names[int(k)], *(f"{v:.6g}" for v in row)]) for k, row in zip(labels, p)]
        return "\n".join([",".join(["prediction", *(f"p_{n}" for n in names)]), *rows]) + "\n"
    if kind == "binary":
        names = classes if len(classes) == 2 else ["0", "1"]
        rows = [f"{names[int(k)]},{v:.6g}" for k, v in zip(labels, p)]
        return "\n".join([f"prediction,p_{names[1]}", *rows]) + "\n"
    rows = [",".join(f"{v:.6g}" for v in np.atleast_1d(row)) for row in p]
    return "\n".join([",".join(f"y{i}" for i in range(np.atleast_2d(p).shape[1])), *rows]) + "\n"
