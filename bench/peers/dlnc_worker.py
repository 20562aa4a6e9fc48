"""The dlnc peer: compiles the model's .dln and trains it with the runtime's own StepRunner.

It runs the same code path as `dlnc run`: `StepRunner.step` with a mini-batch of arrays (the
runner copies it into its pre-bound buffers) and the cost returned as a float every step.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import protocol  # noqa: E402

STATE: dict = {}


def compile_model(path: str, batch: int):
    import dsl
    from runtime.cli import compile_with_data, load_data
    program = dsl.load_file(path, overrides={"batch": str(batch)})
    splits = load_data(program) if program.data is not None else None
    return compile_with_data(program, splits)


def synthetic(compiled, batch: int):
    program = compiled.program
    last = compiled.layers[-1].output[-1]
    if program.input.kind == "tokens":
        steps = int(program.data.sequence_length) if program.data is not None else 32
        return protocol.synthetic_tokens(batch, steps, int(last))
    return protocol.synthetic_classification(batch, tuple(program.input.shape), int(last))


def mini_batches(compiled, batch: int) -> list[dict[str, np.ndarray]]:
    """The synthetic mini-batches a round cycles through, as the step's inputs x and y."""
    spec = compiled.spec
    xs, ys = synthetic(compiled, batch)
    return [{spec.x: xs[i], spec.y: ys[i]} for i in range(len(xs))]


def setup(request):
    from runtime.session import StepRunner
    batch, threads = int(request["batch"]), int(request["threads"])
    compiled = compile_model(request["path"], batch)
    runner = StepRunner(compiled, request.get("device", "cpu"), threads)
    spec = compiled.spec
    batches = mini_batches(compiled, batch)
    STATE.update(compiled=compiled, threads=threads, device=request.get("device", "cpu"),
                 xs=np.stack([b[spec.x] for b in batches]))
    count = len(batches)

    def step(n: int) -> float:
        loss = 0.0
        for i in range(n):
            loss = runner.step(batches[i % count])
        return loss

    flops = sum(info.flops for info in compiled.layers)
    first = compiled.layers[0].flops
    info = {"forward_flops": flops, "train_flops": 3 * flops - first,
            "parameters": int(sum(p.init.size for p in spec.params)),
            "train_nodes": len(compiled.train_step.graph.node), "provider": runner.session.get_providers()[0]}
    return step, info


def infer(batch: int):
    import onnxruntime as ort

    from runtime.session import make_session, ort_device
    compiled = STATE["compiled"]
    session = make_session(compiled.model.SerializeToString(), STATE["device"], STATE["threads"])
    name = session.get_inputs()[0].name
    xs = STATE["xs"].reshape(-1, *STATE["xs"].shape[2:])
    x = np.ascontiguousarray(np.resize(xs, (batch, *xs.shape[1:])))
    if STATE["device"] == "cpu":
        return lambda: session.run(None, {name: x})
    # on the GPU, as the other peers: the input already in device memory, the output left there
    # (a run waits for its kernels to finish)
    io = session.io_binding()
    io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, *ort_device(STATE["device"])))
    for output in session.get_outputs():
        io.bind_output(output.name, *ort_device(STATE["device"]))
    return lambda: session.run_with_iobinding(io)


if __name__ == "__main__":
    protocol.serve(setup, infer)
