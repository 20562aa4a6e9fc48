"""ONNX Runtime sessions for dlnc graphs: options, providers, and the two-set step binding.

The training step's parameters and optimiser state live in OrtValues, in two sets used in
turn: step k reads set A and writes set B, step k + 1 reads B and writes A. Both IOBindings
are made once, so a step binds only the mini-batch and copies no weights.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime as ort

from compiler.program import Compiled
from dsl.errors import DlnError

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def make_session(model_bytes: bytes, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DlnError("--device cuda needs ONNX Runtime's CUDA provider, which this installation lacks; "
                       "install onnxruntime-gpu in place of onnxruntime, or run with --device cpu")
    return ort.InferenceSession(model_bytes, session_options(threads), providers=PROVIDERS[device])


def ort_device(device: str) -> tuple[str, int]:
    return ("cuda", 0) if device == "cuda" else ("cpu", 0)


class StepRunner:
    """Runs the training step with parameters and state held in two alternating OrtValue sets."""

    def __init__(self, compiled: Compiled, device: str = "cpu", threads: int | None = None):
        spec = compiled.spec
        self.spec = spec
        self.device = ort_device(device)
        self.session = make_session(compiled.train_step.SerializeToString(), device, threads)
        initial = {p.name: p.init for p in spec.params} | {s.name: s.init for s in spec.state}
        self.updated = tuple(spec.updates)                      # inputs with a new value each step
        fixed = [name for name in initial if name not in spec.updates]  # frozen parameters
        self.sets = [{n: self._ortvalue(initial[n]) for n in self.updated} for _ in range(2)]
        self.fixed = {n: self._ortvalue(initial[n]) for n in fixed}
        self.loss = self._ortvalue(np.zeros((), np.float32))
        self.hyper = {name: self._ortvalue(np.asarray(v, np.float32)) for name, v in spec.hyper.items()}
        self.bindings = [self._bind(src, dst) for src, dst in ((0, 1), (1, 0))]
        self.current = 0                                        # the set that holds the latest values

    def _ortvalue(self, array: np.ndarray) -> ort.OrtValue:
        # ortvalue_from_numpy wraps CPU memory without copying: give each OrtValue its own buffer
        return ort.OrtValue.ortvalue_from_numpy(np.array(array, order="C", copy=True), *self.device)

    def _bind(self, src: int, dst: int) -> ort.IOBinding:
        io = self.session.io_binding()
        for name in self.updated:
            io.bind_ortvalue_input(name, self.sets[src][name])
            io.bind_ortvalue_output(self.spec.updates[name], self.sets[dst][name])
        for name, value in {**self.fixed, **self.hyper}.items():
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(self.spec.loss, self.loss)
        return io

    def set_hyper(self, values: Mapping[str, float]) -> None:
        """Change scalar hyperparameters (lr, epoch, λ, β…); they take effect at the next step."""
        for name, value in values.items():
            if name in self.hyper:
                self.hyper[name].update_inplace(np.asarray(value, np.float32))

    def step(self, batch: Mapping[str, np.ndarray]) -> float:
        """One training step on a mini-batch (x, y and any dropout noise); returns the cost J."""
        io = self.bindings[self.current]
        for name, array in batch.items():
            io.bind_cpu_input(name, array)
        self.session.run_with_iobinding(io)
        self.current = 1 - self.current
        return float(self.loss.numpy())

    def values(self) -> dict[str, ort.OrtValue]:
        """The latest parameters, buffers and optimiser state, as OrtValues (no copy)."""
        return {**self.fixed, **self.sets[self.current]}

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: value.numpy().copy() for name, value in self.values().items()}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Overwrite the latest values (restoring the best weights, or resuming)."""
        values = self.values()
        for name, array in arrays.items():
            values[name].update_inplace(np.asarray(array, dtype=values[name].numpy().dtype, order="C"))
