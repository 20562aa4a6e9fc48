"""Make the two data sets of examples/cats_mismatch.dln: web_images.npz and phone_images.npz.

Real data, two distributions, in the situation of the course notes' cat classifier: many
clean "web" pictures to train on, and fewer "phone" pictures from the distribution that
matters.

- Source: the 1,797 handwritten digits bundled with scikit-learn (`load_digits`: 8×8 grey
  images, values 0..16; UCI optdigits, BSD licence as part of scikit-learn).
- Label: binary, y = 1 when the digit is 5 or more ("cat"), else 0.
- The images are shuffled with seed 0 and cut into two disjoint sets, so no phone picture is
  a copy of a web picture:
  - web_images.npz: 1,197 images, scaled to [0, 1];
  - phone_images.npz: 600 images, made to look like bad phone photos: blurred (3×3 binomial
    filter), moved by one pixel in a random direction, lower contrast on a brighter
    background (0.7·x + 0.2), a left-to-right lighting gradient, and Gaussian sensor noise
    (σ = 0.06), clipped to [0, 1].
- Arrays: x float32 (n, 1, 8, 8), y float32 (n,) of 0/1.

Run it from anywhere with the project's environment: `python examples/make_mismatch.py`. It
writes the two files beside itself (the .dln names them relative to its own folder). The
output is deterministic: the same files every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SEED = 0
PHONE = 600
HERE = Path(__file__).resolve().parent


def blur(images: np.ndarray) -> np.ndarray:
    """3×3 binomial filter [1 2 1]ᵀ[1 2 1] / 16, edges repeated."""
    k = np.array([1.0, 2.0, 1.0]) / 4.0
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = k[0] * padded[:, :-2, :] + k[1] * padded[:, 1:-1, :] + k[2] * padded[:, 2:, :]
    return k[0] * rows[:, :, :-2] + k[1] * rows[:, :, 1:-1] + k[2] * rows[:, :, 2:]


def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved one pixel up, down, left or right (zeros come in)."""
    out = np.zeros_like(images)
    for i, direction in enumerate(rng.integers(0, 4, size=len(images))):
        dy, dx = [(-1, 0), (1, 0), (0, -1), (0, 1)][direction]
        src = images[i]
        out[i, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            src[max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
    return out


def phone_look(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = shift(blur(images), rng)
    x = 0.7 * x + 0.2
    x = x + np.linspace(-0.1, 0.1, 8)[None, None, :]          # uneven lighting
    x = x + rng.normal(0.0, 0.06, size=x.shape)
    return np.clip(x, 0.0, 1.0)


def make() -> tuple[dict, dict]:
    digits = load_digits()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(digits.target))
    images = (digits.images[order] / 16.0).astype(np.float64)
    labels = (digits.target[order] >= 5).astype(np.float32)
    web_x, phone_x = images[:-PHONE], phone_look(images[-PHONE:], rng)
    web = {"x": web_x[:, None].astype(np.float32), "y": labels[:-PHONE]}
    phone = {"x": phone_x[:, None].astype(np.float32), "y": labels[-PHONE:]}
    return web, phone


def main() -> None:
    web, phone = make()
    for name, arrays in (("web_images.npz", web), ("phone_images.npz", phone)):
        np.savez_compressed(HERE / name, **arrays)
        print(f"wrote {HERE / name}: x {arrays['x'].shape}, {int(arrays['y'].sum())} of "
              f"{len(arrays['y'])} labelled 1 (digit >= 5)")


if __name__ == "__main__":
    main()
