"""The PyTorch eager peer: the same models, torch.optim.Adam (its default implementation),
torch.set_num_threads(threads), the loss read back as a float every step as dlnc does; with
--device cuda the model and the mini-batches live on the GPU."""
from __future__ import annotations

import protocol
from protocol import NotAvailable

STATE: dict = {}


def build(torch, request):
    nn = torch.nn
    model = request["model"]
    arch = request.get("arch") or {}
    if model == "mlp":
        layers, n_in = [], arch["input"]
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
        for units, act in arch["layers"]:
            layers.append(nn.Linear(n_in, units))
            if act in acts:
                layers.append(acts[act]())
            n_in = units
        return nn.Sequential(*layers), (arch["input"],), arch["layers"][-1][0]
    if model == "lenet5":
        net = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
        return net, (1, 28, 28), 10
    if model == "gru_char":
        vocab, embed, hidden = arch.get("vocab", 64), arch.get("embed", 32), arch.get("hidden", 128)

        class CharGRU(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(vocab, embed)
                self.gru = nn.GRU(embed, hidden, batch_first=True)
                self.out = nn.Linear(hidden, vocab)

            def forward(self, x):
                h, _ = self.gru(self.embed(x))
                return self.out(h).reshape(-1, vocab)
        return CharGRU(), None, vocab
    raise NotAvailable(f"no torch model for {model}")


def setup(request):
    import torch
    torch.set_num_threads(int(request["threads"]))
    torch.manual_seed(0)
    batch = int(request["batch"])
    net, features, classes = build(torch, request)
    if features is None:
        xs, ys = protocol.synthetic_tokens(batch, int(request.get("arch", {}).get("steps", 32)), classes)
    else:
        xs, ys = protocol.synthetic_classification(batch, features, classes)
    device = torch.device("cuda" if request.get("device") == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this torch build has no CUDA")
    net = net.to(device)
    xs, ys = torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)   # on the device beforehand
    batches = [(xs[i], ys[i].reshape(-1)) for i in range(len(xs))]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    STATE.update(net=net, xs=xs, torch=torch)

    def step(n: int) -> float:
        loss = 0.0
        for i in range(n):
            x, y = batches[i % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            out = loss_fn(net(x), y)
            out.backward()
            optimizer.step()
            loss = out.item()
        return loss

    return step, {"version": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}


def infer(batch: int):
    torch, net = STATE["torch"], STATE["net"]
    xs = STATE["xs"].reshape(-1, *STATE["xs"].shape[2:])
    x = xs[:batch].contiguous() if len(xs) >= batch else xs.repeat((batch // len(xs) + 1,) + (1,) * (xs.dim() - 1))[:batch]

    def run():
        with torch.inference_mode():
            y = torch.softmax(net(x), -1)
        if y.is_cuda:                    # the kernels run asynchronously: time them, not their launch
            torch.cuda.synchronize()
        return y
    net.eval()
    return run


if __name__ == "__main__":
    protocol.serve(setup, infer)
