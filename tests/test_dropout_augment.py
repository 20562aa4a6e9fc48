"""Dropout and augmentation, tested statistically.

Dropout: a program whose only hidden layer is dropout on a constant input of ones, followed by
`dense 1` trained with sgd lr=1, reveals each step's mask in the weight update: the update of
W[j] is zero exactly where unit j was dropped.
"""
from __future__ import annotations

import numpy as np
import pytest

import dsl
from compiler.program import compile_program
from dsl import ast
from runtime.augment import augment_images
from runtime.session import StepRunner

UNITS = 400
KEEP = 0.7
DROPOUT_PROGRAM = f"""model drop
input x: float[{UNITS}]
output y: real[1]
layers {{ dropout keep_prob={KEEP}; dense 1 }}
train {{ optimizer sgd lr=1.0; batch_size 1; epochs 1 }}
"""


def masks(seed: int, steps: int) -> np.ndarray:
    """The dropout mask of each step, read off the weight updates; noise drawn as the trainer does."""
    compiled = compile_program(dsl.load(DROPOUT_PROGRAM))
    runner = StepRunner(compiled)
    rng = np.random.default_rng([seed, 2])
    (noise_name, _), = compiled.spec.noise
    x = np.ones((1, UNITS), np.float32)
    out = []
    for _ in range(steps):
        before = runner.arrays()["dense_2.W"].copy()
        runner.step({"x": x, "y": np.full((1, 1), 5.0, np.float32),
                     noise_name: rng.random((1, UNITS), dtype=np.float32)})
        out.append(runner.arrays()["dense_2.W"] != before)
    return np.concatenate(out)


def test_keep_rate_lies_within_a_binomial_bound():
    kept = masks(seed=0, steps=10)
    n = kept.size
    bound = 4 * np.sqrt(KEEP * (1 - KEEP) / n)          # four standard deviations
    assert abs(kept.mean() - KEEP) < bound


def test_mask_changes_between_steps_and_repeats_with_the_seed():
    first, again, other = masks(0, 5), masks(0, 5), masks(1, 5)
    assert not np.array_equal(first[0], first[1])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_dropout_is_absent_from_the_exported_model_and_off_at_evaluation():
    compiled = compile_program(dsl.load(DROPOUT_PROGRAM))
    assert not any("noise" in i.name or "keep_prob" in i.name for i in compiled.model.graph.input)
    assert {n.op_type for n in compiled.model.graph.node} <= {"Gemm", "Identity"}
    assert "dropout_1.keep_prob" in {i.name for i in compiled.train_step.graph.input}


def test_per_layer_keep_prob_is_a_graph_input_each():
    text = DROPOUT_PROGRAM.replace(f"dropout keep_prob={KEEP}; dense 1",
                                   "dense 8 relu; dropout keep_prob=0.5; dense 8 relu; dropout keep_prob=0.9; dense 1")
    spec = compile_program(dsl.load(text)).spec
    assert spec.hyper["dropout_2.keep_prob"] == 0.5 and spec.hyper["dropout_4.keep_prob"] == 0.9


# ---------------------------------------------------------------- augmentation
def images(n=64, size=6):
    return np.arange(n * size * size, dtype=np.float32).reshape(n, 1, size, size) + 1.0


@pytest.mark.parametrize("flip,axis", [("horizontal", 3), ("vertical", 2)])
def test_flip_reverses_about_half_the_examples(flip, axis):
    x = images(400)
    out = augment_images(x, ast.Augment(flip=flip), np.random.default_rng(0))
    flipped = np.array([np.array_equal(o, np.flip(i, axis=axis - 1)) for o, i in zip(out, x)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert np.all(flipped | same) and 0.4 < flipped.mean() < 0.6


@pytest.mark.parametrize("option", ["crop", "translate"])
def test_shifts_stay_within_p_pixels_and_keep_the_content(option):
    x = images(200)
    out = augment_images(x, ast.Augment(**{option: 2}), np.random.default_rng(0))
    assert out.shape == x.shape
    shifts = set()
    for o, i in zip(out, x):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(o, shifted(i, dy, dx))]
        assert found, "every output is the input shifted by at most 2 pixels, zero-filled"
        shifts.add(found[0])
    assert len(shifts) == 25                              # every shift in −2..2 × −2..2 is drawn


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_augmentation_is_reproducible_from_the_seed_and_new_each_draw():
    x, spec = images(50), ast.Augment(flip="horizontal", translate=1)
    a = augment_images(x, spec, np.random.default_rng([7, 3]))
    b = augment_images(x, spec, np.random.default_rng([7, 3]))
    rng = np.random.default_rng([7, 3])
    first, second = augment_images(x, spec, rng), augment_images(x, spec, rng)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first, second)
