"""Where a training step's time goes on one device, from ONNX Runtime's own profiler.

For each model: the step's wall time, then per (provider, op type) the nodes per step and the
host time they take per step (on CUDA that is the time to launch each kernel, not to run it:
a step of small ops is bound by it). Also the cost of one run of a one-node graph (the fixed
price of a call), and whether the CUDA provider can capture the step as a CUDA graph, as
compiled and with the batch size fixed.

Usage: python bench/gpu/profile_step.py [--device cuda] [--steps 50] [--out folder]"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from steps import compiled_with_batches, models_folder, steps_per_second

from runtime import session as sessions

CONFIGS = [("mlp", 32), ("gru_char", 32)]


def profile(compiled, device: str, batches, steps: int, folder: Path) -> dict:
    model = sessions.training_graph(compiled, device).model
    options = sessions.session_options(2)
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"{compiled.program.name}")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=sessions.PROVIDERS[device])
    runner = sessions.StepRunner(compiled, device, 2, session=session)
    for i in range(steps):
        runner.step(batches[i % len(batches)])
    events = json.loads(Path(session.end_profiling()).read_text())
    table: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            args = event.get("args", {})
            table[(args.get("provider", "?"), args.get("op_name", "?"))].append(event["dur"])
    return {key: (len(durs) / steps, sum(durs) / steps) for key, durs in table.items()}


def call_cost(device: str, calls: int = 2000) -> float:
    """µs per run_with_iobinding of a one-node graph on a 32-float tensor bound on the device."""
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = sessions.make_session(model.SerializeToString(), device, 2)
    where = sessions.ort_device(device)
    x = ort.OrtValue.ortvalue_from_numpy(np.ones(32, np.float32), *where)
    y = ort.OrtValue.ortvalue_from_numpy(np.ones(32, np.float32), *where)
    io = session.io_binding()
    io.bind_ortvalue_input("x", x)
    io.bind_ortvalue_output("y", y)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(io)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def with_static_batch(model, batch: int):
    """The step with every symbolic dimension (the batch) fixed: ONNX Runtime then folds the
    shape arithmetic into constants (the MLP's step keeps no Shape or Slice on the CPU)."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in [*static.graph.input, *static.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.ClearField("dim_param")
                dim.dim_value = batch
    return static


def cuda_graph_capture(compiled, batches, batch: int, static: bool) -> str:
    """Whether ONNX Runtime's CUDA provider captures the step (enable_cuda_graph), as compiled or
    with the batch fixed; where it does, its speed and whether its costs are the plain step's.
    (The runner alternates two bindings; a capture replays the addresses of the first.)"""
    model = sessions.training_graph(compiled, "cuda").model
    model = with_static_batch(model, batch) if static else model
    providers = [("CUDAExecutionProvider", {"use_tf32": "0", "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(model.SerializeToString(), sessions.session_options(2), providers=providers)
        runner = sessions.StepRunner(compiled, "cuda", 2, session=session)
        plain = sessions.StepRunner(compiled, "cuda", 2)
        costs = [(runner.step(b), plain.step(b)) for b in (batches * 4)[:10]]
        same = all(abs(a - b) <= 1e-4 * abs(b) for a, b in costs)
        return f"captured: {steps_per_second(runner, batches, 1.0):.0f} steps/s; the plain step's costs: {same} {costs[-2:]}"
    except Exception as exc:                            # the provider's own message is the finding
        return f"not captured: {str(exc).splitlines()[0][:300]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None, help="folder for the profiles (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="dlnc-profile-"))
    folder.mkdir(parents=True, exist_ok=True)
    models = models_folder()
    print(f"one run of a one-node graph: {call_cost(args.device):.1f} µs")
    for model, batch in CONFIGS:
        compiled, batches = compiled_with_batches(models, model, batch)
        plain = sessions.StepRunner(compiled, args.device, 2)
        for i in range(20):
            plain.step(batches[i % len(batches)])
        steps_per_s = steps_per_second(plain, batches, 1.0)
        table = profile(compiled, args.device, batches, args.steps, folder)
        nodes = sum(count for count, _ in table.values())
        host = sum(us for _, us in table.values())
        print(f"\n{model} batch {batch}: {steps_per_s:.0f} steps/s ({1e6 / steps_per_s:.0f} µs a step), "
              f"{nodes:.0f} nodes a step taking {host:.0f} µs of host time")
        print(f"  {'provider':<24} {'op':<22} {'nodes':>6} {'µs/step':>8}")
        for (provider, op), (count, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"  {provider:<24} {op:<22} {count:>6.0f} {us:>8.1f}")
        if args.device == "cuda":
            for static in (False, True):
                print(f"  CUDA graph, {'batch fixed' if static else 'as compiled'}:",
                      cuda_graph_capture(compiled, batches, batch, static))


if __name__ == "__main__":
    main()
