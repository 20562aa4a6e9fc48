"""The PyTorch side of the parity tests: a dlnc program rebuilt as torch modules.

`TorchNet` takes a compiled program and builds the same network from the compiler's own initial
parameters: nn.Linear, nn.Conv2d with explicit zero padding, nn.MaxPool2d / nn.AvgPool2d,
nn.Flatten, and nn.BatchNorm1d/2d with torch's momentum = 1 − dlnc's. It returns the last
layer's logits; the output activation is fused into the loss, as in dlnc's training step.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dsl import ast

TORCH_ACTIVATIONS = {"linear": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def torch_activation(act: ast.Activation) -> nn.Module:
    return nn.LeakyReLU(act.alpha) if act.kind == "leaky_relu" else TORCH_ACTIVATIONS[act.kind]()


def torch_padding(layer: ast.Conv, h: int, w: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) as F.pad takes them. `same` follows TensorFlow: output ⌈n/s⌉,
    the total padding max((⌈n/s⌉ − 1)·s + k − n, 0) split with the odd pixel at the end."""
    if layer.padding != "same":
        return (layer.padding,) * 4

    def split(n):
        total = max((-(-n // layer.stride) - 1) * layer.stride + layer.size - n, 0)
        return total // 2, total - total // 2
    (top, bottom), (left, right) = split(h), split(w)
    return left, right, top, bottom


def torch_optimizer(opt: ast.Optimizer, params) -> tuple[torch.optim.Optimizer, float]:
    """The torch optimiser for dlnc's, and the factor from dlnc's α to torch's lr."""
    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.lr), 1.0
    if opt.kind == "momentum":   # torch's buffer is dlnc's v / (1 − β)
        return torch.optim.SGD(params, lr=opt.lr * (1 - opt.beta), momentum=opt.beta), 1 - opt.beta
    if opt.kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt.lr, alpha=opt.beta2, eps=opt.eps), 1.0
    return torch.optim.Adam(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps), 1.0


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """max|a − b| / max|b| (the absolute difference when b is all zeros)."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def parity_differences(dlnc_losses, torch_losses, dlnc_arrays, torch_arrays) -> dict[str, float]:
    """The relative difference of the loss sequence and of every tensor torch has."""
    assert np.all(np.isfinite(dlnc_losses)) and np.all(np.isfinite(torch_losses))
    diffs = {"loss": relative(np.asarray(dlnc_losses), np.asarray(torch_losses))}
    for name, expected in torch_arrays.items():
        assert dlnc_arrays[name].shape == expected.shape, name
        diffs[name] = relative(dlnc_arrays[name], expected)
    return diffs


def assert_within(diffs: dict[str, float], tolerance: float) -> None:
    bad = {k: f"{v:.2e}" for k, v in diffs.items() if not v <= tolerance}
    assert not bad, f"relative differences above {tolerance:g}: {bad}"


class TorchNet:
    """The program's layers as torch modules returning the last layer's logits, with `params`
    keyed by the dlnc parameter names."""

    def __init__(self, compiled, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        init = {p.name: torch.tensor(p.init) for p in compiled.spec.params}
        program = compiled.program
        self.regularized = [p.name for p in compiled.spec.params if p.regularized]
        self.output = program.output.kind
        self.params: dict[str, nn.Parameter] = {}
        self.batchnorms: dict[str, nn.Module] = {}
        image = len(program.input.shape) == 3
        channels, h, w = program.input.shape if image else (0, 0, 0)
        modules = []
        for i, layer in enumerate(program.layers):
            last = i == len(program.layers) - 1
            if isinstance(layer, ast.Conv):
                left, right, top, bottom = torch_padding(layer, h, w)
                modules.append(nn.ZeroPad2d((left, right, top, bottom)))
                conv = nn.Conv2d(channels, layer.filters, layer.size, stride=layer.stride)
                self._bind(conv, layer.name, init, "W", "b")
                modules += [conv, torch_activation(layer.activation)]
                channels = layer.filters
                h = (h + top + bottom - layer.size) // layer.stride + 1
                w = (w + left + right - layer.size) // layer.stride + 1
            elif isinstance(layer, ast.Pool):
                pool = nn.MaxPool2d if layer.kind == "max" else nn.AvgPool2d
                modules.append(pool(layer.size, stride=layer.stride))
                h, w = (h - layer.size) // layer.stride + 1, (w - layer.size) // layer.stride + 1
            elif isinstance(layer, ast.Flatten):
                modules.append(nn.Flatten())
                image = False
            elif isinstance(layer, ast.BatchNorm):
                features = init[f"{layer.name}.gamma"].shape[0]
                norm = (nn.BatchNorm2d if image else nn.BatchNorm1d)(features, momentum=1.0 - layer.momentum,
                                                                   eps=layer.eps)
                self._bind(norm, layer.name, init, "gamma", "beta")
                self.batchnorms[layer.name] = norm
                modules.append(norm)
            elif isinstance(layer, ast.Dense):
                weight = init[f"{layer.name}.W"]
                dense = nn.Linear(weight.shape[1], weight.shape[0])
                self._bind(dense, layer.name, init, "W", "b")
                modules.append(dense)
                if not last:
                    modules.append(torch_activation(layer.activation))
            else:
                raise TypeError(f"the torch reference has no {type(layer).__name__} layer")
        self.model = nn.Sequential(*modules).to(dtype).train()     # .to keeps the Parameter objects

    def _bind(self, module: nn.Module, layer: str, init, weight: str, bias: str) -> None:
        with torch.no_grad():
            module.weight.copy_(init[f"{layer}.{weight}"])
            module.bias.copy_(init[f"{layer}.{bias}"])
        self.params[f"{layer}.{weight}"], self.params[f"{layer}.{bias}"] = module.weight, module.bias

    def cost(self, x: np.ndarray, y: np.ndarray, lam: float) -> torch.Tensor:
        """Mean data loss from the logits, + λ/(2m)·Σ‖W‖² over the regularised tensors."""
        z = self.model(torch.from_numpy(x).to(self.dtype))
        y = torch.from_numpy(y)
        loss = (F.binary_cross_entropy_with_logits(z.squeeze(1), y.to(self.dtype)) if self.output == "binary"
                else F.cross_entropy(z, y))
        if lam:
            loss = loss + lam / (2 * x.shape[0]) * sum((self.params[n] ** 2).sum() for n in self.regularized)
        return loss

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = self.model.eval()(torch.from_numpy(x).to(self.dtype))
        self.model.train()
        return (torch.sigmoid(z.squeeze(1)) if self.output == "binary" else torch.softmax(z, dim=1)).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: p.detach().numpy().copy() for name, p in self.params.items()}
        for name, norm in self.batchnorms.items():
            out[f"{name}.running_mean"] = norm.running_mean.numpy().copy()
            out[f"{name}.running_var"] = norm.running_var.numpy().copy()
        return out
