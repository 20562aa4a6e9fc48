"""Crash-safe checkpoints of a training run, one at the end of every epoch.

A checkpoint is two files in `RUN/checkpoints/`:
- `epoch-NNNNNN.npz`: every array the run needs to go on (parameters, optimiser state, the
  step counter, batchnorm buffers; with early stopping also the best weights so far, under
  `best/NAME`), saved with `np.savez` and read with `allow_pickle=False`;
- `epoch-NNNNNN.json`: what the arrays belong to (model name, sha256 of the program text, of
  the resolved configuration, of the data and of the parameter names and shapes), the epoch,
  the step, the state of every random stream (shuffle, dropout noise, augmentation: numpy's
  `bit_generator.state`), the early-stopping state, the history so far, and the sha256 of the `.npz` file.

Each file is written atomically (`files.write_atomic`: temporary file in the same folder,
fsync, rename, fsync of the folder). The `.npz` goes first and the `.json` last: the `.json`
is the commit record, so a checkpoint is complete exactly when its `.json` exists. Only then
are the older checkpoints deleted (their `.json` first), so the previous checkpoint stays
until the new one is complete, and a crash at any moment leaves at least one complete
checkpoint once the first has been written.

`latest` finds the newest complete checkpoint and refuses, with a clear `DlnError`, one that
belongs to another model, program, configuration, data set or parameter layout, or whose
`.npz` fails its checksum. No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dsl.errors import DlnError

from .files import fsync_folder, remove_temporaries, write_atomic

FOLDER = "checkpoints"
FORMAT = 1
BEST = "best/"                       # npz key prefix of the early-stopping best weights
_NAME = re.compile(r"^epoch-(\d{6,})\.json$")


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be resumed."""

    model: str
    source_sha256: str               # the program text
    config_sha256: str               # resolved hyperparameters (params after --set, train block)
    data_sha256: str                 # the data the splits came from
    params_sha256: str               # names, shapes and dtypes of the arrays

    def as_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Checkpoint:
    meta: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    path: Path                       # the .json file

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def layout_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of the sorted names, shapes and dtypes of a set of arrays."""
    layout = [[name, list(np.shape(a)), str(np.asarray(a).dtype)] for name, a in sorted(arrays.items())]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(a, order="C") for name, a in arrays.items()})
    return buffer.getvalue()


def stem(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def save(folder: Path, epoch: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write the checkpoint of `epoch` (arrays first, then the JSON that commits it), then
    delete the older ones. Returns the JSON's path."""
    folder = Path(folder)
    blob = npz_bytes(arrays)
    name = stem(epoch)
    write_atomic(folder / f"{name}.npz", blob)
    record = {"format": FORMAT, **meta, "epoch": epoch, "arrays": f"{name}.npz",
              "arrays_sha256": hashlib.sha256(blob).hexdigest(), "arrays_bytes": len(blob)}
    path = folder / f"{name}.json"
    write_atomic(path, json.dumps(record, indent=1, allow_nan=True).encode())
    _drop_older(folder, epoch)
    return path


def _drop_older(folder: Path, epoch: int) -> None:
    """Delete checkpoints older than `epoch`: the JSON first (the checkpoint stops being
    complete), then its arrays; also arrays that never got their JSON."""
    changed = False
    for json_path, e in complete(folder):
        if e < epoch:
            json_path.unlink(missing_ok=True)
            (folder / f"{stem(e)}.npz").unlink(missing_ok=True)
            changed = True
    for npz in folder.glob("epoch-*.npz"):
        found = re.match(r"^epoch-(\d+)\.npz$", npz.name)
        if found and int(found.group(1)) < epoch and not (folder / f"{npz.stem}.json").exists():
            npz.unlink(missing_ok=True)
            changed = True
    if changed:
        fsync_folder(folder)


def complete(folder: Path) -> list[tuple[Path, int]]:
    """The committed checkpoints in `folder` (their JSON files), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((path, int(match.group(1))))
    return sorted(found, key=lambda item: -item[1])


def clean(folder: Path) -> None:
    """Remove what interrupted writes left: temporary files, arrays without their JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    remove_temporaries(folder, ("epoch-*",))
    for npz in folder.glob("epoch-*.npz"):
        if not (folder / f"{npz.stem}.json").exists():
            npz.unlink(missing_ok=True)


def latest(folder: Path, expected: Identity | None = None) -> Checkpoint | None:
    """The newest complete checkpoint in `folder`, verified; None when there is none.

    Refuses (DlnError) a checkpoint that does not match `expected`, or whose arrays are
    missing, damaged or fail their checksum."""
    folder = Path(folder)
    done = complete(folder)
    if not done:
        return None
    path, epoch = done[0]
    meta = _read_meta(path)
    if expected is not None:
        _check_identity(path, meta, expected)
    arrays_path = folder / str(meta.get("arrays", f"{stem(epoch)}.npz"))
    try:
        blob = arrays_path.read_bytes()
    except OSError as exc:
        raise DlnError(f"checkpoint {path.name} is incomplete: its arrays {arrays_path.name} cannot be read "
                       f"({exc.strerror or exc}) — start over with --force", path=str(path)) from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("arrays_sha256"):
        raise DlnError(f"checkpoint {path.name} fails its checksum: {arrays_path.name} has sha256 {digest[:12]}…, "
                       f"the checkpoint recorded {str(meta.get('arrays_sha256'))[:12]}… — the file is damaged; "
                       "dlnc will not resume from it (start over with --force)", path=str(arrays_path))
    arrays = _read_arrays(blob, arrays_path)
    if expected is not None:
        state = {n: a for n, a in arrays.items() if not n.startswith(BEST)}
        if layout_hash(state) != expected.params_sha256:
            raise DlnError(f"checkpoint {path.name} holds other parameters (names or shapes) than this model — "
                           "start over with --force", path=str(path))
    return Checkpoint(meta, arrays, path)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DlnError(f"checkpoint {path.name} is damaged (not readable JSON: {exc}) — "
                       "start over with --force", path=str(path)) from None
    required = ("format", "model", "epoch", "step", "arrays_sha256")
    if not isinstance(meta, dict) or any(key not in meta for key in required):
        raise DlnError(f"checkpoint {path.name} is not a dlnc checkpoint (fields missing) — "
                       "start over with --force", path=str(path))
    if meta["format"] != FORMAT:
        raise DlnError(f"checkpoint {path.name} has format {meta['format']}, this dlnc reads format {FORMAT} — "
                       "start over with --force", path=str(path))
    return meta


def _check_identity(path: Path, meta: Mapping[str, Any], expected: Identity) -> None:
    if meta.get("model") != expected.model:
        raise DlnError(f"checkpoint {path.name} belongs to model '{meta.get('model')}', not '{expected.model}' — "
                       "resume in that model's run folder, or choose another -o", path=str(path))
    why = {"source_sha256": "the .dln program has changed since",
           "config_sha256": "the hyperparameters (--set) differ",
           "data_sha256": "the data has changed since",
           "params_sha256": "the parameters (names or shapes) differ"}
    for key, reason in why.items():
        if meta.get(key) != getattr(expected, key):
            raise DlnError(f"checkpoint {path.name} was made by another run of model '{expected.model}': "
                           f"{reason} — resume with the same program, data and --set values, "
                           "or start over with --force", path=str(path))


def _read_arrays(blob: bytes, path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as exc:
        raise DlnError(f"the checkpoint arrays cannot be read ({exc}) — start over with --force",
                       path=str(path)) from None
