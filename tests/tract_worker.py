"""Runs models in tract in a separate process: a panic in tract's native code aborts the process
it runs in, and that must fail one test, not end the whole test session."""
from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np

_pool: concurrent.futures.ProcessPoolExecutor | None = None


def _run(model_bytes: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import os
    import tempfile

    import tract
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model_bytes)
        runnable = tract.onnx().load(path).into_model().into_runnable()
        return [value.to_numpy() for value in runnable.run(inputs)]


def run_all_in_tract(model_bytes: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Every output of the model for its inputs in graph order, computed by tract in a worker process."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return _pool.submit(_run, model_bytes, inputs).result(timeout=300)
    except concurrent.futures.process.BrokenProcessPool:
        _pool = None
        raise RuntimeError("tract aborted its process (a panic in its native code)") from None


def run_in_tract(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The first output of the model for input x, computed by tract in a worker process."""
    return run_all_in_tract(model_bytes, [x])[0]
