"""The line protocol between the harness and one peer worker process (stdlib and numpy only).

Every peer (dlnc, PyTorch, JAX, onnxruntime-training) runs as its own process, started with
its own Python (JAX and onnxruntime-training live in their own virtual environments), so the
harness can interleave the peers' timing rounds and read each one's peak RSS separately.

The harness writes one JSON object per line on the worker's stdin; the worker answers one
JSON object per line on stdout:

    {"op": "setup", "model": "mlp", "batch": 32, "threads": 2, "arch": {...}}
        -> {"ok": true, "info": {...}} | {"ok": false, "reason": "not available yet: ..."}
    {"op": "time", "steps": N}     -> {"ok": true, "seconds": S, "loss": J, "faults": F}   N training steps
                                      (F: the minor page faults the process took meanwhile)
    {"op": "infer", "batch": B, "reps": R} -> {"ok": true, "seconds": S}      R forward passes
    {"op": "rss"}                  -> {"ok": true, "peak_rss_mb": M}
    {"op": "quit"}

A worker module defines `setup(request) -> (step, info)` where `step(n)` runs n training
steps on the prepared mini-batches and returns the last loss as a float, and optionally
`infer(batch) -> run()` for inference latency.
"""
from __future__ import annotations

import json
import resource
import sys
import time
import traceback

import numpy as np

N_BATCHES = 8     # distinct synthetic mini-batches, cycled through (one contiguous array each)


class NotAvailable(Exception):
    """The peer cannot run this model (a feature or a package is missing)."""


def synthetic_classification(batch: int, features: tuple[int, ...], classes: int, seed: int = 0):
    """N_BATCHES mini-batches of N(0, 1) features and uniform labels, each one contiguous array."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_BATCHES, batch, *features), dtype=np.float32)
    y = rng.integers(0, classes, size=(N_BATCHES, batch), dtype=np.int64)
    return x, y


def synthetic_tokens(batch: int, steps: int, vocab: int, seed: int = 0):
    """N_BATCHES mini-batches of token sequences x and their next-token targets y, int64."""
    rng = np.random.default_rng(seed)
    text = rng.integers(0, vocab, size=(N_BATCHES, batch, steps + 1), dtype=np.int64)
    return np.ascontiguousarray(text[..., :-1]), np.ascontiguousarray(text[..., 1:])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(setup, infer=None) -> None:
    """Answer requests from stdin until `quit` or end of input."""
    out = sys.stdout
    sys.stdout = sys.stderr          # stray prints from libraries must not corrupt the protocol
    step = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "quit":
                break
            if op == "setup":
                step, info = setup(request)
                reply = {"ok": True, "info": info}
            elif op == "time":
                n = int(request["steps"])
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                loss = step(n)
                seconds = time.perf_counter() - start
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                reply = {"ok": True, "seconds": seconds, "loss": float(loss), "faults": faults}
            elif op == "infer":
                if infer is None:
                    raise NotAvailable("no inference path")
                run = infer(int(request["batch"]))
                run()
                reps = int(request["reps"])
                times = []
                for _ in range(reps):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                reply = {"ok": True, "seconds": float(np.median(times))}
            elif op == "rss":
                reply = {"ok": True, "peak_rss_mb": peak_rss_mb()}
            else:
                reply = {"ok": False, "reason": f"unknown op {op}"}
        except NotAvailable as exc:
            reply = {"ok": False, "reason": f"not available yet: {exc}"}
        except Exception as exc:  # report, keep serving: the harness prints the reason in the table
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
