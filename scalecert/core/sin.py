"""SIN calibration: static channel importances alpha_c >= 0 and a static threshold tau.

score(i, j) = sum_c alpha_c * phi(A_c(i, j)); gate(i, j) = score(i, j) > tau.
Both parameters are fixed once here and stored in the graph: a per-image top-k or any statistic
over the whole image would let a patch change which far-away positions survive.
"""
from __future__ import annotations

import numpy as np


def magnitude(features: np.ndarray, phi: str) -> np.ndarray:
    return np.abs(features) if phi == "abs" else np.maximum(features, 0)


def scores(features: np.ndarray, alpha: np.ndarray, phi: str) -> np.ndarray:
    """(N,C,H,W) -> (N,H,W), computed as the prefix graph computes it."""
    return (magnitude(features, phi) * alpha.reshape(1, -1, 1, 1).astype(np.float32)).sum(axis=1)


def gradient_free_importance(features: np.ndarray, phi: str) -> np.ndarray:
    """Without gradients: weight each channel by the inverse of its mean magnitude, so every
    channel contributes its relative activation and no single large-scale channel dominates."""
    mean = magnitude(features, phi).mean(axis=(0, 2, 3))
    alpha = 1.0 / (mean + 1e-6)
    alpha[mean <= 1e-12] = 0.0
    return (alpha / alpha.max()).astype(np.float32) if alpha.max() > 0 else np.ones_like(mean, np.float32)


def taylor_importance(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """First-order Taylor score per channel: mean |A * dL/dA|, normalised to max 1."""
    score = np.abs(activation * gradient).mean(axis=(0, 2, 3))
    return (score / score.max()).astype(np.float32) if score.max() > 0 else np.ones_like(score, np.float32)


def kill_channels(alpha: np.ndarray, fraction: float) -> np.ndarray:
    """Static channel pruning: zero the importance of the least important fraction of channels."""
    alpha = alpha.copy()
    dead = int(np.floor(fraction * len(alpha)))
    if dead:
        alpha[np.argsort(alpha, kind="stable")[:dead]] = 0.0
    return alpha


def threshold_for_rate(score: np.ndarray, rate: float) -> float:
    """tau such that about `rate` of the calibration positions have score <= tau (pruned).
    rate 0 gives -1: scores are >= 0, so every position is kept (the dense model, exactly)."""
    if rate <= 0:
        return -1.0
    return float(np.quantile(score.reshape(-1).astype(np.float64), rate, method="lower"))


def gate(score: np.ndarray, tau: float) -> np.ndarray:
    return score > np.float32(tau)
