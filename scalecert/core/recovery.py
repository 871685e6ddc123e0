"""Certified recovery (double masking) as pure functions over window-prediction maps
(docs/design.md §10; PatchCleanser's `double_masking`, with the bundle's feature windows in place
of pixel masks).

Inputs are predictions of the suffix on the features with windows zeroed:
- `first`: (W,) labels, one per window of the family (one window zeroed);
- `second`: {i: (W,) labels}, for a window i, the labels with windows i and j zeroed, j over the
  family (j == i is the first-round prediction of i);
- `pairs`: (W, W) labels for every pair (symmetric; the diagonal is the first round).
Margins enter as a boolean "thin" map: a prediction whose margin (core/decision.py::top2_margin)
does not exceed the engine's numeric margin delta cannot be relied on, so it never certifies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Recovery:
    label: int
    case: str  # "agreed" (round 1 unanimous) | "disagreer" (a disagreer's round 2 unanimous) | "majority"
    disagreers: np.ndarray  # window indices whose first-round label differs from the majority


def majority(labels: np.ndarray) -> int:
    """Most frequent label; ties go to the smallest label (deterministic, as torch.mode)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return int(values[np.argmax(counts)])


def first_round_disagreers(first: np.ndarray) -> tuple[int, np.ndarray]:
    """(majority label, indices of windows that predict another label)."""
    label = majority(first)
    return label, np.flatnonzero(np.asarray(first) != label)


def double_masking(first: np.ndarray, second: dict) -> Recovery:
    """PatchCleanser's decision. `second` must hold the second round of every first-round
    disagreer, in the order the disagreers are listed (the first unanimous disagreer wins)."""
    label, disagreers = first_round_disagreers(first)
    if disagreers.size == 0:
        return Recovery(label, "agreed", disagreers)
    for i in disagreers:
        row = np.asarray(second[int(i)])
        if np.all(row == first[i]):
            return Recovery(int(first[i]), "disagreer", disagreers)
    return Recovery(label, "majority", disagreers)


def certified_recovery(pairs: np.ndarray, label: int, thin: np.ndarray | None = None) -> bool:
    """Recovery is certified for `label` when every pair of windows (each window with itself
    included) predicts it, each with a margin the engine's numerics cannot flip."""
    pairs = np.asarray(pairs)
    ok = bool(np.all(pairs == label))
    if thin is not None:
        ok = ok and not bool(np.any(thin))
    return ok
