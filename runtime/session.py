"""ONNX Runtime sessions for dlnc graphs: options, providers, and the two-set step binding.

The training step's parameters and optimiser state live in OrtValues, in two sets used in
turn: step k reads set A and writes set B, step k + 1 reads B and writes A. Both IOBindings
are made once, so a step copies no weights and rebinds nothing but the mini-batch.

A value whose update may overwrite it (`in_place_updates`: every read of it comes first) has
one buffer that both sets share, so the step writes its new value over the old. The large ones
(the flat parameters, Adam's moments) usually qualify; that halves the memory the update
streams through (1 to 6 % faster MLP steps, bench/NOTES.md section 21).

The trainable parameters live in one flat OrtValue per set (the step's input `params`, see
`compiler.program.FlatView`); each parameter's own input is bound to its slice of that buffer by
address, so the forward pass reads the same memory the update writes, with no copy. The
gradients go the same way: the runner runs `training_graph`, in which each gradient is an output
bound to its slice of one buffer that the update reads whole (`compiler.gradients_in_place`).

Where the values live:
- cpu: every OrtValue wraps a numpy array the runner owns (no copies). A mini-batch array is
  bound as it is (zero-copy, about 1 µs an input), and the cost is read from the numpy array
  that backs the bound `loss` output.
- cuda: parameters, optimiser state, buffers and hyperparameters are allocated in device
  memory once and stay there; ONNX Runtime writes the new values into the other device set.
  Each mini-batch is copied host → device into input buffers allocated once per batch shape
  and bound once; only the scalar cost comes back to host memory, through an output bound
  to a CPU OrtValue. `values()` hands out the device OrtValues (the evaluator binds them as
  they are); `arrays()` copies to the host.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from compiler.gradients_in_place import GRADS, gradients_in_place
from compiler.onnx_graph import producers, reads
from compiler.program import FLAT, Compiled, FlatView, TrainStepSpec, initial_values, runner_spec
from compiler.train import MIN_DECAY, MOMENT_SCALE, Folding
from dsl.errors import DlnError

# cuda: float32 products in float32, TensorFloat-32 off (ONNX Runtime turns it on by default;
# PyTorch's float32 matrix products leave it off), so a step on the GPU computes what it does on
# the CPU; an op without a CUDA kernel runs on the CPU provider
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]}
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
                "tensor(bool)": np.bool_}


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """All graph optimisations; a sequential executor whose intra-op pool has `threads` threads
    (None: one per core), spinning between ops (the default: a step is a chain of short ops,
    and waking a sleeping thread for each would cost more than the op).

    An op's loop is split into blocks of decreasing size (what is left ÷ the number of threads),
    claimed as threads come free, not into equal parts fixed in advance: where a core is
    taken away for a while (a shared or virtual machine), the other threads do its share. The same
    speed on a quiet machine; 7 to 21 % faster MLP steps while a core was slow (bench/NOTES.md
    section 22)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.dynamic_block_base", "1")
    options.log_severity_level = 3
    return options


def default_threads() -> int:
    """One intra-op thread per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                                   # not on Linux
        return max(1, os.cpu_count() or 1)


CUDA_MISSING = ("ONNX Runtime's CUDA provider is not installed here "
                "(install onnxruntime-gpu in place of onnxruntime)")
CUDA_NOT_LOADED = ("ONNX Runtime's CUDA provider is installed but did not load "
                   "(check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed)")


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu needs, once per process.

    Its CUDA provider finds them only on the loader's search path, unless they are loaded
    first. `ort.preload_dlls` (onnxruntime-gpu 1.21 and later) loads them from the nvidia-*
    wheels in site-packages (`pip install onnxruntime-gpu[cuda,cudnn]`), then from the search
    path. It prints a line for each library it cannot find; those lines are dropped here,
    because `cuda_problem` reports the outcome in one line."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:                                   # the CPU build, or an older onnxruntime
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):             # what stays missing, the probe session reports
            preload()


def make_session(model_bytes: bytes, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DlnError(f"--device cuda: {CUDA_MISSING}; or run with --device cpu")
        preload_cuda_libraries()
    session = ort.InferenceSession(model_bytes, session_options(threads), providers=PROVIDERS[device])
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu is installed but its CUDA provider did not load (CUDA or cuDNN missing)
        raise DlnError(f"--device cuda: {CUDA_NOT_LOADED}; or run with --device cpu")
    return session


def cuda_problem() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can: a one-node session says
    whether the provider ONNX Runtime lists actually loads."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return CUDA_MISSING
    preload_cuda_libraries()
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.set_default_logger_severity(4)     # the provider's own load errors: dlnc says it in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=PROVIDERS["cuda"])
    except Exception:                                   # the provider's libraries failed to load
        return CUDA_NOT_LOADED
    finally:
        ort.set_default_logger_severity(3)
    return None if session.get_providers()[0] == "CUDAExecutionProvider" else CUDA_NOT_LOADED


def resolve_device(requested: str) -> tuple[str, str | None]:
    """The device to train on and, when it is not the one asked for, why: --device cuda falls
    back to the CPU where the CUDA provider is missing or does not load."""
    if requested == "cuda":
        problem = cuda_problem()
        if problem is not None:
            return "cpu", f"--device cuda: {problem}; training on the CPU instead"
    return requested, None


def ort_device(device: str) -> tuple[str, int]:
    return ("cuda", 0) if device == "cuda" else ("cpu", 0)


@dataclass(frozen=True)
class TrainingGraph:
    """The training step a runner runs and the spec it binds it by; its gradient outputs, each
    bound to its slice of the input GRADS (none: the step joins them); and how its optimiser keeps
    its moments scaled (None: as `train_step.onnx` keeps them)."""
    model: onnx.ModelProto
    spec: TrainStepSpec
    gradients: tuple[FlatView, ...] = ()
    folding: Folding | None = None


def training_graph(compiled: Compiled, device: str = "cpu", join_gradients: bool = False,
                   folded: bool | None = None) -> TrainingGraph:
    """The training step the runner runs. On the CPU:
    - the runner's form of it (`compiled.runner_step`), where the optimiser keeps its moments
      scaled, which saves a pass over the parameters a step (MLP 784-256-128-10 with Adam, batch
      32: 4 to 6 % faster steps, bench/NOTES.md section 24), unless the program's decay is under
      MIN_DECAY (a β of 0), which the runner's form would not give exactly (`folded`: that form
      or not, as an existing session has it);
    - unless `join_gradients`, where the step joins its gradients into one row, each gradient an
      output bound to its slice of the input GRADS, which the update reads, so nothing is copied
      to join them (`compiler.gradients_in_place`).
    Elsewhere, the step as exported. On CUDA, the Reshape that orders the update after the
    gradients takes its shape in host memory, so the GPU's stream is drained halfway through every
    step, while the Concat it saves is one short copy on the GPU: the step as compiled ran
    1.12–1.19× as fast (MLP, batch 32) and 1.12–1.14× (batch 512) in three A/Bs on an H100
    (bench/NOTES.md section 23). The folded moments are untried on a GPU."""
    graph = TrainingGraph(compiled.train_step, compiled.spec)
    if device != "cpu":
        return graph
    runner = compiled.runner_step
    if folded is None:
        folded = runner is not None and compiled.spec.hyper.get(runner.folding.decay, 1.0) >= MIN_DECAY
    if folded:
        graph = TrainingGraph(runner.model, runner_spec(compiled.spec), folding=runner.folding)
    bound = None if join_gradients else gradients_in_place(graph.model, graph.spec)
    return graph if bound is None else replace(graph, model=bound.model, gradients=bound.outputs)


UNFOLD_ABOVE = 2.0 ** 20     # the runner unfolds its moments once their scale passes this (float32: up to 2¹²⁸)


ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Relu", "Sqrt", "Max", "Min"})


def in_place_updates(graph: onnx.GraphProto, spec: TrainStepSpec) -> frozenset[str]:
    """The updated inputs X whose new value the step may write over X itself, in one buffer:
    - every node that reads X (or, for FLAT, one of the parameters viewing it) is an ancestor of
      the node that writes new X, so any order that ONNX Runtime runs the nodes in reads X first;
    - that node reads X, if at all, elementwise (output index i from X[i] alone: X has the
      output's shape, so nothing broadcasts).
    Values read elsewhere (Adam's scalar k, read beside the node making new k; a weight that an
    L2 cost term reads only for the reported loss) keep two buffers."""
    producer = producers(graph)
    read = {id(node): reads(node) for node in graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in read[id(node)]:
            readers.setdefault(name, []).append(node)
    aliases = {FLAT: [v.name for v in spec.flat]}
    safe = set()
    for name, new in spec.updates.items():
        writer = producer.get(new)
        if writer is None:
            continue
        ancestors, stack = set(), list(read[id(writer)])
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in ancestors:
                ancestors.add(id(node))
                stack.extend(read[id(node)])
        uses = [r for alias in [name, *aliases.get(name, ())] for r in readers.get(alias, ())]
        if all(id(r) in ancestors or (r is writer and r.op_type in ELEMENTWISE) for r in uses):
            safe.add(name)
    return frozenset(safe)


class StepRunner:
    """Runs the training step with parameters and state held in two alternating OrtValue sets."""

    def __init__(self, compiled: Compiled, device: str = "cpu", threads: int | None = None,
                 session: ort.InferenceSession | None = None):
        """`session`: an existing session of this training graph (a search reuses one per architecture)."""
        # a search's trials share the session of their architecture's first: its form decides
        folded = None if session is None else MOMENT_SCALE in {i.name for i in session.get_inputs()}
        graph = training_graph(compiled, device, folded=folded)
        spec, model = graph.spec, graph.model
        self.spec = spec
        self.on_device = device == "cuda"
        self.device = ort_device(device)
        self.gradients, self.folding = graph.gradients, graph.folding
        self.session = session or make_session(model.SerializeToString(), device, threads)
        self.input_dtypes = {i.name: NUMPY_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        initial = initial_values(spec)
        self.updated = tuple(spec.updates)                      # inputs with a new value each step
        self.views = {v.name: v for v in spec.flat}             # trainable parameters: slices of FLAT
        self.in_place = in_place_updates(model.graph, spec)    # one buffer for both sets
        fixed = [name for name in initial if name not in spec.updates and name not in self.views]  # frozen
        # the runner's own copies: training must not write through to compiled.spec
        self._host: list[dict[str, np.ndarray]] = [{}, {}]         # cpu: the arrays behind each set
        self.sets = [self._new_set(initial, 0)]
        self.sets.append(self._new_set(initial, 1, shared=self.sets[0]))
        self.fixed = {n: self._ortvalue(initial[n]) for n in fixed}
        # the joined gradient, written by the gradient outputs and read by the update (both sets)
        self._grads = self._ortvalue(np.zeros_like(initial[FLAT])) if self.gradients else None
        self.hyper = {name: self._ortvalue(np.asarray(v, np.float32)) for name, v in spec.hyper.items()}
        self._loss = np.zeros((), np.float32)                   # host memory on every device
        self.loss = ort.OrtValue.ortvalue_from_numpy(self._loss)
        self._view_values = [self._make_views(i) for i in range(2)]
        self.bindings = [self._bind(src, dst) for src, dst in ((0, 1), (1, 0))]
        self.current = 0                                        # the set that holds the latest values
        self._batch_buffers: dict[tuple, dict[str, ort.OrtValue]] = {}   # cuda: per batch shape
        self._bound: list[dict[str, int]] = [{}, {}]            # cuda: id of the buffer each binding holds
        self._held: list[np.ndarray] = []                        # cpu: the mini-batch arrays bound last
        self._epoch: dict[str, np.ndarray] = {}                 # epoch_batches' buffers

    def _ortvalue(self, array: np.ndarray) -> ort.OrtValue:
        array = np.array(array, order="C", copy=True)          # own memory, never the caller's
        return ort.OrtValue.ortvalue_from_numpy(array, *self.device)

    def _new_set(self, initial: Mapping[str, np.ndarray], index: int,
                 shared: Mapping[str, ort.OrtValue] | None = None) -> dict[str, ort.OrtValue]:
        """Set `index`'s values: new buffers, but `shared`'s own for the values updated in place."""
        values = {}
        for name in self.updated:
            if shared is not None and name in self.in_place:
                values[name] = shared[name]
                if not self.on_device:
                    self._host[index][name] = self._host[0][name]
                continue
            array = np.array(initial[name], order="C", copy=True)
            if not self.on_device:
                self._host[index][name] = array                 # FLAT's: the parameters' views slice it
            values[name] = ort.OrtValue.ortvalue_from_numpy(array, *self.device)
        return values

    def _make_views(self, index: int) -> dict[str, ort.OrtValue]:
        """On the CPU, each trainable parameter of set `index` as an OrtValue over its slice of
        FLAT (no copy; `values()` hands them out). A device buffer cannot be sliced into an
        OrtValue, so on CUDA `values()` copies the slices instead."""
        if self.on_device or not self.views:
            return {}
        return {v.name: ort.OrtValue.ortvalue_from_numpy(v.of(self._host[index][FLAT])) for v in self.views.values()}

    def _bind(self, src: int, dst: int) -> ort.IOBinding:
        io = self.session.io_binding()
        for name in self.updated:
            io.bind_ortvalue_input(name, self.sets[src][name])
            io.bind_ortvalue_output(self.spec.updates[name], self.sets[dst][name])
        if self.views:
            flat = self.sets[src][FLAT]
            dtype = NUMPY_DTYPES.get(flat.data_type(), np.float32)
            itemsize = np.dtype(dtype).itemsize
            for v in self.views.values():     # a parameter's input: its slice of FLAT, by address
                io.bind_input(v.name, *self.device, dtype, list(v.shape), flat.data_ptr() + v.offset * itemsize)
            if self.gradients:
                io.bind_ortvalue_input(GRADS, self._grads)
            for v in self.gradients:          # a gradient output: its slice of GRADS, by address
                io.bind_output(v.name, *self.device, dtype, list(v.shape), self._grads.data_ptr() + v.offset * itemsize)
        for name, value in {**self.fixed, **self.hyper}.items():
            io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(self.spec.loss, self.loss)
        return io

    def set_hyper(self, values: Mapping[str, float]) -> None:
        """Change scalar hyperparameters (lr, epoch, λ, β…); they take effect at the next step."""
        for name, value in values.items():
            if name in self.hyper:
                self.hyper[name].update_inplace(np.asarray(value, np.float32))

    def _host_array(self, name: str, array: np.ndarray) -> np.ndarray:
        """The array as the graph takes it: C-contiguous, of the input's dtype (no copy if it is)."""
        return np.ascontiguousarray(array, dtype=self.input_dtypes.get(name, array.dtype))

    def _bind_batch_on_device(self, io: ort.IOBinding, bound: dict[str, int],
                              batch: Mapping[str, np.ndarray]) -> None:
        """Copy the mini-batch into device buffers made once per batch shape; rebind only when
        the binding holds another buffer (the first step, or a last, smaller batch)."""
        arrays = {name: self._host_array(name, a) for name, a in batch.items()}
        key = tuple((name, a.shape) for name, a in arrays.items())
        buffers = self._batch_buffers.get(key)
        if buffers is None:
            buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(a.shape, a.dtype, *self.device)
                       for name, a in arrays.items()}
            self._batch_buffers[key] = buffers
        for name, array in arrays.items():
            buffer = buffers[name]
            buffer.update_inplace(array)                        # host → device
            if bound.get(name) != id(buffer):
                io.bind_ortvalue_input(name, buffer)
                bound[name] = id(buffer)

    def step(self, batch: Mapping[str, np.ndarray]) -> float:
        """One training step on a mini-batch (x, y and any dropout noise); returns the cost J."""
        io = self.bindings[self.current]
        if self.on_device:
            self._bind_batch_on_device(io, self._bound[self.current], batch)
        else:
            # bound zero-copy: the arrays must outlive the run, so the runner holds them
            self._held = [self._host_array(name, a) for name, a in batch.items()]
            for name, array in zip(batch, self._held):
                io.bind_cpu_input(name, array)
        self.session.run_with_iobinding(io)
        self.current = 1 - self.current
        if self.folding is not None and float(self._host[self.current][MOMENT_SCALE]) > UNFOLD_ABOVE:
            self._unfold()                                      # (a float compares in 0.05 µs, an array in 0.5)
        return float(self._loss)

    def _unfold(self) -> None:
        """Bring the folded moments back to the exported step's scale: M ← M/B^power, B ← 1
        (`compiler.program.RunnerStep`). A pass over each moment, every few hundred steps or more."""
        if self.folding is None:
            return
        host = self._host[self.current]
        scale = float(host[MOMENT_SCALE])
        if scale == 1.0:
            return
        for name, power in self.folding.powers.items():
            np.multiply(host[name], host[name].dtype.type(scale ** -power), out=host[name])
        host[MOMENT_SCALE][...] = 1.0

    def epoch_batches(self, arrays: Mapping[str, np.ndarray],
                      batches: Sequence[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """An epoch's mini-batches gathered once, in order, into contiguous arrays of the graph's
        dtypes that the runner reuses every epoch; yields each mini-batch as views of them, so a
        step neither allocates nor copies (on the CPU the views are bound as they are)."""
        order = np.concatenate(batches) if len(batches) else np.zeros(0, np.int64)
        gathered = {}
        for name, array in arrays.items():
            dtype = np.dtype(self.input_dtypes.get(name, array.dtype))
            shape = (len(order), *array.shape[1:])
            buffer = self._epoch.get(name)
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
                buffer = self._epoch[name] = np.empty(shape, dtype)
            if array.dtype == dtype:
                np.take(array, order, axis=0, out=buffer)
            else:
                buffer[...] = array[order]
            gathered[name] = buffer
        start = 0
        for idx in batches:
            end = start + len(idx)
            yield {name: buffer[start:end] for name, buffer in gathered.items()}
            start = end

    def values(self) -> dict[str, ort.OrtValue]:
        """The latest parameters (each trainable one as its slice of FLAT), buffers and optimiser
        state, as OrtValues: no copy on the CPU; on CUDA the slices are copied. The optimiser state
        is the exported step's (the runner's moments unfolded, their scale left out)."""
        self._unfold()
        current = {name: value for name, value in self.sets[self.current].items() if name != MOMENT_SCALE}
        views = self._view_values[self.current]
        if self.views and not views:                            # cuda
            flat = current[FLAT].numpy()
            views = {v.name: self._ortvalue(v.of(flat)) for v in self.views.values()}
        return {**self.fixed, **current, **views}

    def arrays(self) -> dict[str, np.ndarray]:
        """Host copies of every value by name; FLAT is left out, its views carry it."""
        return {name: value.numpy().copy() for name, value in self.values().items() if name != FLAT}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Overwrite the latest values (restoring the best weights, or resuming); a trainable
        parameter is written into its slice of FLAT. Optimiser state is the exported step's."""
        self._unfold()
        current = {**self.fixed, **self.sets[self.current]}
        arrays = {name: array for name, array in arrays.items() if name != MOMENT_SCALE}
        into_flat = {name: array for name, array in arrays.items() if name in self.views}
        if into_flat:
            flat = current[FLAT].numpy()
            for name, array in into_flat.items():
                self.views[name].of(flat)[...] = np.reshape(array, self.views[name].shape)
            current[FLAT].update_inplace(flat)
        for name, array in arrays.items():
            if name in into_flat:
                continue
            target = current[name]
            dtype = NUMPY_DTYPES.get(target.data_type(), np.float32)
            target.update_inplace(np.asarray(array, dtype=dtype, order="C"))
