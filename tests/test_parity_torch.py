"""Training parity with PyTorch: the compiled training step against the same model in torch.

Each case compiles a .dln program, builds the identical torch model from the compiler's own
initial parameters, and trains both for a fixed number of steps on the same seeded synthetic
mini-batch sequence (a fresh permutation per epoch). The cost J of every step (computed with
the weights before the update) and the final parameters must agree, measured per tensor as
max|a − b| / max|b|. The torch side follows the documented semantics: BCEWithLogitsLoss /
CrossEntropyLoss (mean) + λ/(2m)·Σ‖W‖², SGD, SGD(momentum=β, lr=α(1−β)), RMSprop(alpha=β₂),
Adam, a manual per-epoch learning rate for lr_decay, clip_grad_norm_, and BatchNorm1d.

Run with `-s` to see the largest relative differences observed per optimiser.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from torch import nn

import dsl
from compiler.program import compile_program
from dsl import ast
from runtime.session import StepRunner
from torch_reference import TorchNet, assert_within, parity_differences, relative, torch_optimizer

# ---------------------------------------------------------------- tolerances and sizes
TOLERANCE = {"sgd": 1e-4, "momentum": 1e-4, "rmsprop": 1e-3, "adam": 1e-3}
STEPS = 50
EXAMPLES = 60          # with mini-batches of 16 the last batch of each epoch has 12 (tests m per batch)
FEATURES = 6
MINI_BATCH = 16

NETWORKS = {
    "logistic": ("binary", "dense 1 sigmoid"),
    "shallow": ("binary", "dense 4 tanh; dense 1 sigmoid"),
    "deep": ("class[3]", "dense 16 relu; dense 8 leaky_relu; dense 8 leaky_relu(0.2); dense 6 tanh; "
                         "dense 3 softmax"),
}
OPTIMIZERS = {
    "sgd": "sgd lr=0.1",
    "momentum": "momentum lr=0.1 beta=0.9",
    # rmsprop's step g/√s has size ~α whatever |g|: once a parameter reaches its optimum (g ≈ 0) it
    # oscillates with the sign of rounding noise, so α stays small enough not to get there in STEPS.
    "rmsprop": "rmsprop lr=0.002 beta2=0.99 eps=1e-8",
    "adam": "adam lr=0.01 beta1=0.9 beta2=0.999 eps=1e-8",
}
REGULARIZATION = {"none": "", "l2": "regularize l2 lambda=0.05"}

OBSERVED: dict[str, float] = defaultdict(float)   # optimiser -> largest relative difference seen


@pytest.fixture(scope="module", autouse=True)
def report_observed():
    yield
    print("\nlargest relative differences vs torch:")
    for name, value in sorted(OBSERVED.items()):
        print(f"  {name:10s} {value:.3e}")


# ---------------------------------------------------------------- programs and data
def program_text(output: str, layers: str, optimizer: str, batch_size, train_extra: str = "") -> str:
    return (f"model parity\ninput x: float[{FEATURES}]\noutput y: {output}\nlayers {{ {layers} }}\n"
            f"train {{ optimizer {optimizer}; batch_size {batch_size}; epochs 100; seed 3\n{train_extra}\n}}\n")


def synthetic_data(kind: str, classes: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features; labels from a fixed random linear rule with a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype(np.float32)
    if kind == "binary":
        score = x @ rng.normal(size=FEATURES) + 0.5 * rng.normal(size=EXAMPLES)
        return x, (score > 0).astype(np.float32)
    scores = x @ rng.normal(size=(FEATURES, classes)) + 0.5 * rng.normal(size=(EXAMPLES, classes))
    return x, scores.argmax(axis=1).astype(np.int64)


def batch_schedule(batch_size: int, steps: int, seed: int = 1):
    """(epoch, indices) for each step: a seeded permutation per epoch, cut into mini-batches."""
    rng = np.random.default_rng(seed)
    schedule, epoch = [], 0
    while len(schedule) < steps:
        order = rng.permutation(EXAMPLES)
        schedule += [(epoch, order[i:i + batch_size]) for i in range(0, EXAMPLES, batch_size)]
        epoch += 1
    return schedule[:steps]


def decayed(train: ast.Train, epoch: int) -> float:
    lr, decay = train.optimizer.lr, train.lr_decay
    if decay is None:
        return lr
    if decay.kind == "inverse":
        return lr / (1 + decay.rate * epoch)
    if decay.kind == "exponential":
        return lr * decay.rate ** epoch
    return lr * decay.factor ** math.floor(epoch / decay.every)


# ---------------------------------------------------------------- running both
def torch_betas(group: dict, changes: dict[str, float]) -> None:
    """Set dlnc's β hyperparameters in a torch param group (Adam's betas, RMSprop's alpha)."""
    if "betas" in group:
        group["betas"] = (changes.get("beta1", group["betas"][0]), changes.get("beta2", group["betas"][1]))
    elif "beta2" in changes:
        group["alpha"] = changes["beta2"]


def train_both(text: str, batch_size: int | None, steps: int = STEPS, changes: dict | None = None):
    """Train dlnc and torch side by side; returns their loss sequences, final arrays and the
    global gradient norms torch saw (before clipping). `changes`: {step: {hyperparameter:
    value}} set in both before that step (what `dlnc tune` does to a running program)."""
    compiled = compile_program(dsl.load(text))
    program, spec = compiled.program, compiled.spec
    x, y = synthetic_data(program.output.kind, program.output.size)
    net, runner = TorchNet(compiled), StepRunner(compiled)     # torch copies the inits first
    optimizer, lr_scale = torch_optimizer(program.train.optimizer, list(net.params.values()))
    reg = program.train.regularize
    lam = reg.lam if reg is not None else 0.0
    clip = program.train.clip_norm
    dlnc_losses, torch_losses, norms = [], [], []
    for number, (epoch, idx) in enumerate(batch_schedule(batch_size or EXAMPLES, steps)):
        runner.set_hyper({"epoch": float(epoch), **(changes or {}).get(number, {})})
        for group in optimizer.param_groups:
            torch_betas(group, (changes or {}).get(number, {}))
        for group in optimizer.param_groups:
            group["lr"] = decayed(program.train, epoch) * lr_scale
        dlnc_losses.append(runner.step({spec.x: x[idx], spec.y: y[idx]}))
        optimizer.zero_grad()
        loss = net.cost(x[idx], y[idx], lam)
        loss.backward()
        if clip is not None:
            norms.append(float(nn.utils.clip_grad_norm_(list(net.params.values()), clip)))
        optimizer.step()
        torch_losses.append(float(loss.detach()))
    return (np.array(dlnc_losses), np.array(torch_losses), runner.arrays(), net.arrays(), norms)


def assert_parity(result, tolerance: float, label: str) -> None:
    dlnc_losses, torch_losses, dlnc_arrays, torch_arrays, _ = result
    diffs = parity_differences(dlnc_losses, torch_losses, dlnc_arrays, torch_arrays)
    OBSERVED[label] = max(OBSERVED[label], *diffs.values())
    assert_within(diffs, tolerance)


def assert_trained(result) -> None:
    """The run did something: the loss moved (so parity is not trivially between two idle runs)."""
    losses = result[1]
    assert losses[-1] < losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------- 1. networks × optimisers × reg × batch
@pytest.mark.parametrize("batch", ["full", MINI_BATCH])
@pytest.mark.parametrize("reg", list(REGULARIZATION))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("network", list(NETWORKS))
def test_parity(network, opt, reg, batch):
    output, layers = NETWORKS[network]
    text = program_text(output, layers, OPTIMIZERS[opt], batch, REGULARIZATION[reg])
    result = train_both(text, None if batch == "full" else batch)
    assert_parity(result, TOLERANCE[opt], opt)
    assert_trained(result)


def test_l2_term_is_in_the_cost():
    """With the same weights, the l2 program's first cost exceeds the plain one by λ/(2m)·Σ‖W‖²."""
    output, layers = NETWORKS["deep"]
    plain = compile_program(dsl.load(program_text(output, layers, "sgd lr=0.1", "full")))
    l2 = compile_program(dsl.load(program_text(output, layers, "sgd lr=0.1", "full", "regularize l2 lambda=0.05")))
    x, y = synthetic_data("class", 3)
    j_plain = StepRunner(plain).step({"x": x[:12], "y": y[:12]})
    j_l2 = StepRunner(l2).step({"x": x[:12], "y": y[:12]})
    penalty = sum(float((p.init.astype(np.float64) ** 2).sum()) for p in l2.spec.params if p.regularized)
    assert j_l2 - j_plain == pytest.approx(0.05 / (2 * 12) * penalty, rel=1e-4)


def test_runner_keeps_its_own_copy_of_the_initial_values():
    """Training must not write through to `compiled.spec` (the initial values), and a second
    runner on the same compiled program starts where the first one did."""
    output, layers = NETWORKS["shallow"]
    compiled = compile_program(dsl.load(program_text(output, layers, OPTIMIZERS["adam"], "full")))
    before = {p.name: p.init.copy() for p in compiled.spec.params}
    x, y = synthetic_data("binary")
    first = StepRunner(compiled)
    j0 = first.step({"x": x, "y": y})
    first.step({"x": x, "y": y})
    for p in compiled.spec.params:
        np.testing.assert_array_equal(p.init, before[p.name], err_msg=p.name)
    assert StepRunner(compiled).step({"x": x, "y": y}) == j0


# ---------------------------------------------------------------- 2. learning-rate decay by epoch
DECAYS = {
    "inverse": "lr_decay inverse rate=0.5",
    "exponential": "lr_decay exponential rate=0.8",
    "step": "lr_decay step every=3 factor=0.5",
}


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_lr_decay(decay, opt):
    output, layers = NETWORKS["shallow"]
    text = program_text(output, layers, OPTIMIZERS[opt], MINI_BATCH, DECAYS[decay])
    assert_parity(train_both(text, MINI_BATCH), TOLERANCE[opt], opt)


def test_lr_decay_changes_training():
    """The epoch input is live: the decayed run ends elsewhere than the undecayed one."""
    output, layers = NETWORKS["shallow"]
    plain = train_both(program_text(output, layers, OPTIMIZERS["sgd"], MINI_BATCH), MINI_BATCH)
    decayed_run = train_both(program_text(output, layers, OPTIMIZERS["sgd"], MINI_BATCH, DECAYS["exponential"]),
                             MINI_BATCH)
    assert relative(decayed_run[2]["dense_1.W"], plain[2]["dense_1.W"]) > 1e-2


# ---------------------------------------------------------------- 3. global-norm clipping
@pytest.mark.parametrize("opt", ["sgd", "momentum", "rmsprop", "adam"])
@pytest.mark.parametrize("clip", [0.05, 0.5])
def test_clip_norm(clip, opt):
    output, layers = NETWORKS["deep"]
    text = program_text(output, layers, OPTIMIZERS[opt], MINI_BATCH, f"clip_norm {clip}")
    result = train_both(text, MINI_BATCH)
    norms = result[4]
    assert any(n > clip for n in norms), "clipping never engaged; the case tests nothing"
    assert_parity(result, TOLERANCE[opt], opt)


@pytest.mark.parametrize("opt", ["rmsprop", "adam"])
def test_betas_changed_mid_run(opt):
    """The backward pass delivers (1 − β)-scaled gradients and Adam keeps s scaled by a β-dependent
    k (compiler/train.py); a β changed between steps, as `dlnc tune` does, must still give
    exactly torch's update with the new β from that step on."""
    output, layers = NETWORKS["deep"]
    text = program_text(output, layers, OPTIMIZERS[opt], MINI_BATCH, "clip_norm 0.5")
    changes = {20: {"beta1": 0.6, "beta2": 0.9}, 35: {"beta1": 0.95, "beta2": 0.999}}
    changed, unchanged = train_both(text, MINI_BATCH, changes=changes), train_both(text, MINI_BATCH)
    assert relative(changed[2]["dense_1.W"], unchanged[2]["dense_1.W"]) > 1e-3, "the change changed nothing"
    assert_parity(changed, TOLERANCE[opt], opt)


# ---------------------------------------------------------------- 4. batchnorm
BATCHNORM_NETWORKS = {
    "after-relu": ("class[3]", "dense 8 relu; batchnorm; dense 3 softmax"),
    "options": ("binary", "dense 8 tanh; batchnorm momentum=0.8 eps=1e-3; dense 4 relu; batchnorm; dense 1 sigmoid"),
}


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("batch", ["full", MINI_BATCH])
@pytest.mark.parametrize("network", list(BATCHNORM_NETWORKS))
def test_batchnorm(network, batch, opt):
    output, layers = BATCHNORM_NETWORKS[network]
    text = program_text(output, layers, OPTIMIZERS[opt], batch, "regularize l2 lambda=0.02")
    result = train_both(text, None if batch == "full" else batch)
    dlnc_arrays = result[2]
    assert any(name.endswith(".running_var") for name in dlnc_arrays)
    assert_parity(result, TOLERANCE[opt], opt)
