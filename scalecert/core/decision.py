"""The certification decision as pure functions over a window-prediction map.

Given the base prediction y0 = argmax g(S) and, for every window W, p_W = argmax g(S_W) with its
margin (top-1 minus top-2 logit): the image is certified with label y0 iff every p_W equals y0
and every margin is at least delta (delta > 0 only where the engine is not bit-exact across
batch positions). Otherwise it is an alert, and the disagreeing windows localise the patch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Decision:
    certified: bool
    label: int
    alert_windows: np.ndarray  # indices into the window family


def top2_margin(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, top-1 minus top-2) per row."""
    labels = logits.argmax(axis=1)
    if logits.shape[1] < 2:
        return labels, np.full(len(logits), np.inf, dtype=np.float32)
    part = np.partition(logits, -2, axis=1)
    return labels, part[:, -1] - part[:, -2]


def expand_groups(group_of_window: np.ndarray, group_values: np.ndarray, empty_value) -> np.ndarray:
    """Per-window values from per-distinct-window values; windows that hold no kept position
    (group -1) see exactly the un-occluded features and take the base value."""
    out = np.full(len(group_of_window), empty_value, dtype=np.result_type(group_values, np.asarray(empty_value)))
    hit = group_of_window >= 0
    out[hit] = group_values[group_of_window[hit]]
    return out


def disagreeing(base_label: int, window_labels: np.ndarray, window_margins: np.ndarray, delta: float) -> np.ndarray:
    """Windows that break the certificate: another label, or too thin a margin for the engine."""
    return np.flatnonzero((window_labels != base_label) | (window_margins < delta))


def decide(base_label: int, base_margin: float, window_labels: np.ndarray, window_margins: np.ndarray,
           delta: float = 0.0) -> Decision:
    bad = disagreeing(base_label, window_labels, window_margins, delta)
    certified = bad.size == 0 and base_margin >= delta
    return Decision(bool(certified), int(base_label), bad)
