"""Loss and error of a model's outputs against labels, computed in numpy (float64).

Outputs are what the exported model gives: probabilities of class 1 `(n,)` for binary,
class probabilities `(n, C)` for class, values `(n, K)` for real, next-token probabilities
`(n, T, V)` for tokens per_step (loss summed over the steps; error per token). Losses are computed from
the last layer's pre-activation z (the logits) in the same stable forms the training step
uses, without regularisation; the error is the misclassification rate, or the mean squared
error for real outputs.
"""
from __future__ import annotations

import numpy as np

def cross_entropy(p: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    """−(1/m) Σ log softmax(z)[y], with log-sum-exp shifted by the maximum; per-step outputs
    (z (m, T, V), y (m, T)) sum over the steps: −(1/m) Σ_i Σ_t log softmax(z_it)[y_it]"""
    z = z.astype(np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_p, y.astype(np.int64)[..., None], axis=-1)[..., 0]
    return float(-np.mean(picked.reshape(len(y), -1).sum(axis=1)))


def binary_cross_entropy(p: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    """(1/m) Σ max(z, 0) − z·y + log(1 + e^{−|z|}), the logit form of −(y log p + (1 − y) log(1 − p))"""
    z = z.astype(np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def mean_squared_error(p: np.ndarray, z: np.ndarray | None, y: np.ndarray) -> float:
    return float(np.mean((p.astype(np.float64).reshape(y.shape) - y) ** 2))


LOSS_FUNCTIONS = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
                  "mse": mean_squared_error}


def predictions(output_kind: str, p: np.ndarray) -> np.ndarray:
    """Class indices for class outputs, 0/1 for binary, the values themselves for real."""
    if output_kind in ("class", "tokens"):             # tokens: the likeliest token at every step
        return np.argmax(p, axis=-1)
    if output_kind == "binary":
        return (p >= 0.5).astype(np.int64)
    return p


def error_rate(output_kind: str, p: np.ndarray, y: np.ndarray) -> float:
    if output_kind == "real":
        return mean_squared_error(p, None, y)
    return float(np.mean(predictions(output_kind, p) != y.astype(np.int64)))
