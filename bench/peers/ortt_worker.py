"""The onnxruntime-training peer (run with the Python of its own venv, /work/venvs/ortt:
onnxruntime-training 1.19.2, onnx<1.17, numpy<2). The forward model is written with
onnx.helper, then `artifacts.generate_artifacts` adds the cross-entropy loss, the gradient
graph and the AdamW optimiser graph (its fused multi-tensor com.microsoft op); training
runs through `onnxruntime.training.api` Module and Optimizer with the same thread count."""
from __future__ import annotations

import tempfile

import numpy as np

import protocol
from protocol import NotAvailable

STATE: dict = {}


def forward_model(arch):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    sizes = [arch["input"]] + [u for u, _ in arch["layers"]]
    nodes, inits, names = [], [], []
    a = "x"
    for i, ((units, act), n_in) in enumerate(zip(arch["layers"], sizes[:-1])):
        w = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(units, n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(units, np.float32), f"b{i}")]
        names += [f"W{i}", f"b{i}"]
        z = f"z{i}"
        nodes.append(helper.make_node("Gemm", [a, f"W{i}", f"b{i}"], [z], transB=1))
        if act == "relu":
            nodes.append(helper.make_node("Relu", [z], [f"a{i}"]))
            a = f"a{i}"
        else:
            a = z
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info(a, TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, names


def setup(request):
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    if request["model"] != "mlp":
        raise NotAvailable("the onnxruntime-training peer runs the MLP only")
    threads, batch = int(request["threads"]), int(request["batch"])
    model, names = forward_model(request["arch"])
    folder = tempfile.mkdtemp(prefix="ortt-")
    artifacts.generate_artifacts(model, requires_grad=names, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(f"{folder}/checkpoint")
    module = Module(f"{folder}/training_model.onnx", state, f"{folder}/eval_model.onnx", device="cpu",
                    session_options=options)
    optimizer = Optimizer(f"{folder}/optimizer_model.onnx", module)
    optimizer.set_learning_rate(1e-3)
    xs, ys = protocol.synthetic_classification(batch, (request["arch"]["input"],), request["arch"]["layers"][-1][0])
    batches = [(xs[i], ys[i]) for i in range(len(xs))]
    module.train()

    def step(n: int) -> float:
        loss = 0.0
        for i in range(n):
            x, y = batches[i % len(batches)]
            loss = module(x, y)
            optimizer.step()
            module.lazy_reset_grad()
        return float(loss)

    return step, {"version": ort.__version__}


if __name__ == "__main__":
    protocol.serve(setup)
