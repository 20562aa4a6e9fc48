"""Data augmentation of image batches: flips, pad-and-crop, and translation.

`augment_images` draws a new transformation for every example from the generator it is given;
the trainer calls it once per epoch on the train split only, with a generator seeded from the
program's seed, so runs are reproducible and every epoch sees a new draw.

    flip=horizontal   x[..., ::-1] (left-right) for a random half of the examples
    flip=vertical     x[..., ::-1, :] (up-down) for a random half
    crop=P            pad every side with P zeros, then cut a random H×W window (torchvision's
                      RandomCrop(padding=P)): a shift of −P..P in each axis
    translate=P       shift by a random whole number of pixels in −P..P along each axis,
                      filling with zeros
Crop and translate draw the same family of shifts; when both are given they compose.
"""
from __future__ import annotations

import numpy as np

from dsl import ast


def random_flip(x: np.ndarray, axis: int, rng: np.random.Generator) -> np.ndarray:
    """Reverse `axis` of a random half of the examples (each with probability ½)."""
    flipped = rng.random(len(x)) < 0.5
    out = x.copy()
    out[flipped] = np.flip(x[flipped], axis=axis)
    return out


def random_shift(x: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every image by (dy, dx) with dy, dx uniform in −p..p, filling with zeros."""
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    top = rng.integers(0, 2 * p + 1, size=n)
    left = rng.integers(0, 2 * p + 1, size=n)
    rows = (top[:, None] + np.arange(h))[:, None, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, None, :]
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]


def augment_images(x: np.ndarray, augment: ast.Augment, rng: np.random.Generator) -> np.ndarray:
    """A new random transformation of every image in x, (N, C, H, W)."""
    if augment.flip == "horizontal":
        x = random_flip(x, axis=3, rng=rng)
    elif augment.flip == "vertical":
        x = random_flip(x, axis=2, rng=rng)
    for pixels in (augment.crop, augment.translate):
        if pixels:
            x = random_shift(x, pixels, rng)
    return x
