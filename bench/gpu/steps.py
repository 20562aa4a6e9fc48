"""What bench/gpu's scripts share: the benchmark's models compiled as `bench/run.py` compiles them,
their synthetic mini-batches, and a runner's steps per second."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "peers")]

import dlnc_worker  # noqa: E402
import run as bench_run  # noqa: E402  (bench/run.py)


def models_folder() -> Path:
    """A scratch folder with the benchmark's .dln files beside the char model's text."""
    folder = Path(tempfile.mkdtemp(prefix="dlnc-models-"))
    bench_run.prepare_models(folder)
    return folder


def compiled_with_batches(folder: Path, model: str, batch: int):
    """The model compiled for `batch`, and its synthetic mini-batches, as the dlnc peer has them."""
    compiled = dlnc_worker.compile_model(str(folder / bench_run.MODELS[model]), batch)
    return compiled, dlnc_worker.mini_batches(compiled, batch)


def steps_per_second(runner, batches, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner.step(batches[n % len(batches)])
        n += 1
    return n / (time.perf_counter() - start)
