"""Loss and error of a model's outputs against labels, computed in numpy.

Outputs are what the exported model gives: probabilities of class 1 `(n,)` for binary,
class probabilities `(n, C)` for class, values `(n, K)` for real. The loss is the data loss
the training step minimises (without regularisation); the error is the misclassification
rate, or the mean squared error for real outputs.
"""
from __future__ import annotations

import numpy as np

TINY = 1e-12


def cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """−(1/m) Σ log p[y]"""
    picked = p[np.arange(len(y)), y.astype(np.int64)]
    return float(-np.mean(np.log(np.clip(picked, TINY, 1.0))))


def binary_cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """−(1/m) Σ y log p + (1 − y) log(1 − p)"""
    p = np.clip(p, TINY, 1.0 - TINY)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def mean_squared_error(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p.reshape(y.shape) - y) ** 2))


LOSS_FUNCTIONS = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
                  "mse": mean_squared_error}


def predictions(output_kind: str, p: np.ndarray) -> np.ndarray:
    """Class indices for class outputs, 0/1 for binary, the values themselves for real."""
    if output_kind == "class":
        return np.argmax(p, axis=-1)
    if output_kind == "binary":
        return (p >= 0.5).astype(np.int64)
    return p


def error_rate(output_kind: str, p: np.ndarray, y: np.ndarray) -> float:
    if output_kind == "real":
        return mean_squared_error(p, y)
    return float(np.mean(predictions(output_kind, p) != y.astype(np.int64)))
