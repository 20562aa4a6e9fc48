"""The runner's folded moments (`compiler.program.RunnerStep`): on the CPU the runner keeps a moment
of Adam, RMSprop or momentum scaled by a growing scalar B, so its decay costs no pass over the
parameters, and brings B back to 1 before it can overflow and whenever values leave or enter the
runner. Training must give what the exported step gives, to float32 rounding, through those
unfoldings, a β changed mid-run, and a save and load."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from model_cases import ALL_CASES, assert_trains_alike, case, trained

import dsl
from compiler.onnx_graph import reads
from compiler.program import compile_program
from compiler.train import FOLDED_OPTIMIZERS, MIN_DECAY, MOMENT_SCALE
from runtime.session import UNFOLD_ABOVE, StepRunner, training_graph

# float32 rounding, compounded over a few steps: the seed differs (√B·(1 − β₁) and not 1 − β₁),
# so every gradient and moment differs in its last bits
RTOL, ATOL = 1e-4, 1e-6


def exported(compiled):
    """The same program, its runner running the step as exported."""
    return replace(compiled, runner_step=None)


def assert_same_training(losses, arrays, reference_losses, reference_arrays, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6)
    assert arrays.keys() == reference_arrays.keys()
    for name in arrays:
        np.testing.assert_allclose(arrays[name], reference_arrays[name], rtol=rtol, atol=atol, err_msg=name)


WITH_MOMENTS = [spec for spec in ALL_CASES if case(spec).compiled.runner_step is not None]


def test_the_cases_cover_every_folded_optimiser():
    kinds = {case(spec).compiled.program.train.optimizer.kind for spec in WITH_MOMENTS}
    assert kinds == set(FOLDED_OPTIMIZERS), kinds


@pytest.mark.parametrize("spec", WITH_MOMENTS)
def test_every_case_trains_as_its_exported_step(spec):
    compiled = case(spec).compiled
    runner, losses, arrays = trained(compiled, 4)
    assert runner.folding is not None
    reference, reference_losses, reference_arrays = trained(exported(compiled), 4)
    assert reference.folding is None
    # Adam's v/(√s + ε) magnifies the last bits where a gradient is about ε: a few elements of
    # digits_deep and devil_words differ by 4e-4 relative, one of digits_deep's by 5e-3
    assert_trains_alike(compiled, losses, arrays, reference_losses, reference_arrays)


def program(optimizer: str) -> str:
    return f"""model folded
input x: float[6]
output y: class[3]
layers {{
  dense 8 relu
  dense 3 softmax
}}
train {{
  optimizer {optimizer}
  batch_size 8
  seed 0
}}
"""


# decays small enough that B passes UNFOLD_ABOVE every 20 or 30 steps
FAST = {"adam": "adam lr=0.01 beta1=0.8 beta2=0.5", "rmsprop": "rmsprop lr=0.01 beta2=0.5",
        "momentum": "momentum lr=0.1 beta=0.6"}


def batches(count: int):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, 6)).astype(np.float32), "y": rng.integers(0, 3, 8)} for _ in range(count)]


def run(runner: StepRunner, feeds, scales: list | None = None) -> list[float]:
    losses = []
    for feed in feeds:
        losses.append(runner.step(feed))
        if scales is not None:
            scales.append(float(runner.sets[runner.current][MOMENT_SCALE].numpy()))
    return losses


@pytest.mark.parametrize("kind", FAST)
def test_the_runner_unfolds_before_the_scale_can_overflow(kind):
    compiled = compile_program(dsl.load(program(FAST[kind])))
    feeds = batches(70)
    runner, scales = StepRunner(compiled, "cpu", 1), []
    losses = run(runner, feeds, scales)
    assert max(scales) <= UNFOLD_ABOVE and scales.count(1.0) >= 2      # it grew and came back, twice or more
    reference = StepRunner(exported(compiled), "cpu", 1)
    assert_same_training(losses, runner.arrays(), run(reference, feeds), reference.arrays())


@pytest.mark.parametrize("kind", FAST)
def test_values_leave_and_enter_the_runner_as_the_exported_steps(kind):
    compiled = compile_program(dsl.load(program(FAST[kind])))
    feeds = batches(24)
    first, reference = StepRunner(compiled, "cpu", 1), StepRunner(exported(compiled), "cpu", 1)
    run(first, feeds[:12])
    run(reference, feeds[:12])
    saved = first.arrays()
    assert MOMENT_SCALE not in saved and MOMENT_SCALE not in first.values()
    assert_same_training([], saved, [], reference.arrays())        # at the exported step's scale
    run(first, feeds[12:15])                                      # B ≠ 1 when the values are loaded back
    assert float(first.sets[first.current][MOMENT_SCALE].numpy()) > 1.0
    first.load(saved)
    resumed = StepRunner(compiled, "cpu", 1)
    resumed.load(saved)
    losses = run(first, feeds[12:])
    np.testing.assert_array_equal(losses, run(resumed, feeds[12:]))
    for name, array in resumed.arrays().items():
        np.testing.assert_array_equal(first.arrays()[name], array, err_msg=name)
    assert_same_training(losses, resumed.arrays(), run(reference, feeds[12:]), reference.arrays())


@pytest.mark.parametrize("kind", FAST)
def test_a_beta_changed_mid_run_trains_as_the_exported_step(kind):
    compiled = compile_program(dsl.load(program(FAST[kind])))
    feeds = batches(30)
    changed = {"adam": {"beta1": 0.9, "beta2": 0.99}, "rmsprop": {"beta2": 0.9}, "momentum": {"beta": 0.9}}[kind]
    results = []
    for graph in (compiled, exported(compiled)):
        runner = StepRunner(graph, "cpu", 1)
        losses = run(runner, feeds[:10])
        runner.set_hyper(changed)
        results.append((losses + run(runner, feeds[10:]), runner.arrays()))
    assert_same_training(*results[0], *results[1])


@pytest.mark.parametrize("kind", FOLDED_OPTIMIZERS)
def test_the_runners_step_drops_one_decay_pass(kind):
    compiled = compile_program(dsl.load(program(f"{kind} lr=0.01")))
    folded, plain = compiled.runner_step, compiled.train_step
    onnx.checker.check_model(folded.model, full_check=True)
    assert {i.name for i in folded.model.graph.input} == {i.name for i in plain.graph.input} | {MOMENT_SCALE}
    assert {o.name for o in folded.model.graph.output} == ({o.name for o in plain.graph.output}
                                                           | {f"new.{MOMENT_SCALE}"})
    assert MOMENT_SCALE not in {i.name for i in plain.graph.input}
    for name, power in folded.folding.powers.items():
        readers = [node.op_type for node in folded.model.graph.node if name in reads(node)]
        if power == 1.0:                # kept as B·M: M ← M + G^p, its only reader an Add
            assert readers == ["Add"], (name, readers)
    size = sum(v.size for v in compiled.spec.flat)
    assert passes(folded.model, size) == passes(plain, size) - 1
    assert training_graph(compiled).folding == folded.folding
    assert training_graph(compiled, "cuda").folding is None     # the GPU runs the step as exported


def passes(model: onnx.ModelProto, size: int) -> int:
    """The nodes that write a tensor of `size` elements: the update's passes over the parameters."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    sizes = {}
    for value in [*inferred.value_info, *inferred.output]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        sizes[value.name] = int(np.prod(dims)) if dims and min(dims) > 0 else None
    return sum(1 for node in inferred.node if sizes.get(node.output[0]) == size)


@pytest.mark.parametrize("kind", FAST)
def test_a_decay_of_zero_trains_as_the_exported_step(kind):
    # from the program: the runner runs the exported step (B/0 has no finite value)
    zero = {"adam": "adam lr=0.01 beta2=0", "rmsprop": "rmsprop lr=0.01 beta2=0", "momentum": "momentum lr=0.1 beta=0"}
    compiled = compile_program(dsl.load(program(zero[kind])))
    assert compiled.runner_step is not None and training_graph(compiled).folding is None
    feeds = batches(12)
    np.testing.assert_array_equal(run(StepRunner(compiled, "cpu", 1), feeds),
                                  run(StepRunner(exported(compiled), "cpu", 1), feeds))


@pytest.mark.parametrize("kind", FAST)
def test_a_decay_of_zero_set_mid_run_is_min_decay(kind):
    # on the runner's step the decay is MIN_DECAY, as if the exported step were given that
    compiled = compile_program(dsl.load(program(FAST[kind])))
    feeds = batches(12)
    decay = compiled.runner_step.folding.decay
    results = []
    for graph, value in ((compiled, 0.0), (exported(compiled), MIN_DECAY)):
        runner = StepRunner(graph, "cpu", 1)
        losses = run(runner, feeds[:5])
        runner.set_hyper({decay: value})
        results.append((losses + run(runner, feeds[5:]), runner.arrays()))
    if kind != "adam":
        assert_same_training(*results[0], *results[1])
        return
    # Adam's decay is β₂·k_prev/k, which is MIN_DECAY/2 on the exported step that changes β₂; with
    # β₂ that small, Adam divides by one gradient's magnitude, which magnifies any difference
    # (the exported step's moments pass 1e8 within 15 steps): the losses agree, the values stay finite
    np.testing.assert_allclose(results[0][0][:7], results[1][0][:7], rtol=1e-5)
    assert all(np.isfinite(array).all() for array in results[0][1].values())


def test_a_shared_session_decides_the_form_of_the_step():
    # a search builds one session per architecture, from its first trial, and its later trials
    # (another β, maybe 0) train on it: the runner takes the form that session has
    folding = compile_program(dsl.load(program(FAST["momentum"])))
    zero = compile_program(dsl.load(program("momentum lr=0.1 beta=0")))
    feeds = batches(6)
    for first, trial in ((folding, zero), (zero, folding)):
        session = StepRunner(first, "cpu", 1).session
        shared = StepRunner(trial, "cpu", 1, session=session)
        assert (shared.folding is None) == (training_graph(first).folding is None)
        own = StepRunner(trial, "cpu", 1)
        assert_same_training(run(shared, feeds), shared.arrays(), run(own, feeds), own.arrays())
