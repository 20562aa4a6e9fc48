"""Files that dlnc writes and reads: atomic writes, and ONNX models checked before use."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from dsl.errors import DlnError


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX model from a file, with a clear error for a missing, truncated or foreign file,
    and for external data that points outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise DlnError(f"no such model file; give the path of a .onnx file", path=str(path))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:                       # protobuf's DecodeError and friends
        raise DlnError(f"not a readable ONNX model (truncated or another kind of file): {exc}", path=str(path)) from None
    if not model.graph.node and not model.graph.output:
        raise DlnError("not an ONNX model: it has no graph (truncated or another kind of file)", path=str(path))
    folder = path.resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (folder / location).resolve()
            if folder not in target.parents:
                raise DlnError(f"tensor '{tensor.name}' points at external data '{location}' outside the model's "
                               f"folder; dlnc only reads external data that sits beside the model", path=str(path))
    return model
