"""Files that dlnc writes and reads: atomic writes, and ONNX models checked before use.

`write_atomic` writes a temporary file in the target's folder, flushes and fsyncs it, renames
it over the target and fsyncs the folder: a reader (or a crash) sees the old file or the new
one, never a part. A failed write removes its temporary file and becomes a `DlnError` that
says what happened (a full disk, a size limit, a read-only or unwritable folder), so the
command exits with code 2 and no traceback.

Test hook: the environment variable `DLNC_TEST_WRITE_DELAY=SECONDS` makes every atomic
write pause half-way through its temporary file, so fault tests can kill a process during
a write. Nothing else reads it.
"""
from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

import onnx

from dsl.errors import DlnError

TEMP_SUFFIX = ".tmp"
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()


def write_error(path: Path, exc: OSError) -> DlnError:
    """A failed write as a user error that says what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        why = f"the disk is full or a file-size limit was reached ({reason}) — free some space"
    elif exc.errno in _DENIED:
        why = f"{reason} — the folder is read-only or not yours; choose another -o folder"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"{reason} — a file stands where a folder is needed; choose another -o folder"
    elif exc.errno == errno.ENOENT:
        why = f"{reason} — its folder cannot be created there; choose another -o folder"
    elif exc.errno == errno.EISDIR:
        why = f"{reason} — a folder stands where the file should go"
    else:
        why = reason
    return DlnError(f"cannot write {path}: {why}", path=str(path))


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _MODE)
            delay = _test_write_delay()
            if delay:
                half = len(data) // 2
                handle.write(data[:half])
                handle.flush()
                time.sleep(delay)
                handle.write(data[half:])
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or an unlink in `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: Path, names: tuple[str, ...] = ("*",)) -> list[Path]:
    """Delete the temporary files that interrupted `write_atomic`s of the files matching
    `names` (glob patterns) left in `folder`."""
    removed = []
    for name in names:
        try:
            candidates = list(Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"))
        except OSError:
            return removed
        for tmp in candidates:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def _test_write_delay() -> float:
    value = os.environ.get("DLNC_TEST_WRITE_DELAY")
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX model from a file, with a clear error for a missing, truncated or foreign file,
    and for external data that points outside the model's folder."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a model file" if path.is_dir() else "no such model file"
        raise DlnError(f"{what}; give the path of a .onnx file", path=str(path))
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
