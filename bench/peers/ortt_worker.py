"""The onnxruntime-training peer (run with the Python of its own venv, /work/venvs/ortt:
onnxruntime-training 1.19.2, onnx<1.17, numpy<2, torch). The MLP's forward model is written
with onnx.helper; LeNet-5 and the character GRU are built in torch exactly as torch_worker.py
builds them and exported with the legacy TorchScript exporter (`dynamo=False`, opset 17).
`artifacts.generate_artifacts` then adds the cross-entropy loss, the gradient graph and the
AdamW optimiser graph (its fused multi-tensor com.microsoft op); training runs through
`onnxruntime.training.api` Module and Optimizer with the same thread count."""
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


def exported_model(request):
    """LeNet-5 or the character GRU, built by torch_worker.build and exported from torch.

    The module is exported in eval mode with constant folding (neither model has dropout or
    batch normalisation, so the forward graph is the training one): the GRU's gate reordering
    and the weight reshapes are folded into the initializers instead of running every step.
    Every float initializer is trained. The GRU model's logits are (batch·T, vocab), matched
    by labels flattened to (batch·T,)."""
    import io

    import onnx
    import torch
    import torch_worker
    torch.manual_seed(0)
    net, features, classes = torch_worker.build(torch, request)
    batch = int(request["batch"])
    if features is None:
        sample = torch.zeros((batch, int(request.get("arch", {}).get("steps", 32))), dtype=torch.int64)
    else:
        sample = torch.zeros((batch, *features), dtype=torch.float32)
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (sample,), buffer, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamo=False, do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL)
    model = onnx.load_from_string(buffer.getvalue())
    names = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    return model, names, features, classes


def setup(request):
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer
    threads, batch = int(request["threads"]), int(request["batch"])
    if request["model"] == "mlp":
        model, names = forward_model(request["arch"])
        features, classes = (request["arch"]["input"],), request["arch"]["layers"][-1][0]
    elif request["model"] in ("lenet5", "gru_char"):
        model, names, features, classes = exported_model(request)
    else:
        raise NotAvailable(f"no onnxruntime-training model for {request['model']}")
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
    if features is None:
        xs, ys = protocol.synthetic_tokens(batch, int(request.get("arch", {}).get("steps", 32)), classes)
    else:
        xs, ys = protocol.synthetic_classification(batch, features, classes)
    batches = [(xs[i], np.ascontiguousarray(ys[i].reshape(-1))) for i in range(len(xs))]
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
