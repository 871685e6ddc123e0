"""The certification decision as pure functions over a window-prediction map (docs/design.md §2,
§3.6, §7).

Inputs: the base prediction y0 = argmax g(S) and, for every window W, p_W = argmax g(S_W), each
with its margin (top-1 minus top-2 logit) and its log-confidence (log-softmax of the top-1 logit).
Two parameters: delta, the numeric margin of the engine (0 where it is bit-exact across batch
positions), and T, the confidence threshold of the alert operating point (0 by default).

- A window *disagrees* when it predicts another label with confidence >= T. Any disagreeing
  window raises the alert, and the disagreeing windows localise the patch.
- The image is *certified* with label y0 when every window (and the base) predicts y0 with
  margin > delta and log-confidence > log T + delta, strictly: a tie is no certificate.
- A margin is top-1 minus top-2 logit less a floor of ULPS float32 ulps of the row's largest
  |logit| (§3.6): delta is measured on a few images and may be 0, so it is a sample, not a bound;
  a gap within the rounding of the logits' own scale never certifies, whatever delta says.
- Otherwise the status is *uncertified*: the label is reported, with neither an alert nor a
  certificate. With T = 0 every other label disagrees, so this happens only for thin margins on
  an engine that is not bit-exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STATUSES = ("certified", "alert", "uncertified")
ULPS = 4  # the margin floor, in float32 ulps of the row's largest |logit|


@dataclass(frozen=True)
class Decision:
    status: str  # one of STATUSES
    label: int
    alert_windows: np.ndarray  # indices into the window family: the disagreeing windows

    @property
    def certified(self) -> bool:
        return self.status == "certified"


def margin_floor(logits: np.ndarray) -> np.ndarray:
    """Per row: ULPS float32 ulps of its largest |logit| (a gap below it is rounding, not a decision)."""
    scale = np.abs(np.asarray(logits, np.float32)).max(axis=1)
    return (ULPS * np.spacing(np.nan_to_num(scale, nan=np.inf, posinf=np.finfo(np.float32).max))).astype(np.float32)


def top2_margin(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, top-1 minus top-2 minus margin_floor) per row: a tie has a negative margin."""
    labels = logits.argmax(axis=1)
    if logits.shape[1] < 2:
        return labels, np.full(len(logits), np.inf, dtype=np.float32)
    part = np.partition(logits, -2, axis=1)
    return labels, (part[:, -1] - part[:, -2]) - margin_floor(logits)


def log_confidence(logits: np.ndarray) -> np.ndarray:
    """log softmax of the top-1 logit per row (<= 0), computed in float64."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    return -np.log(np.exp(z - top[:, None]).sum(axis=1))


def check_threshold(threshold: float) -> float:
    from scalecert.errors import OptionError

    if not 0.0 <= float(threshold) < 1.0:
        raise OptionError(f"threshold {threshold:g}: expected a confidence in [0, 1)")
    return float(threshold)


def log_threshold(threshold: float) -> float:
    return -math.inf if threshold <= 0 else math.log(threshold)


def expand_groups(group_of_window: np.ndarray, group_values: np.ndarray, empty_value) -> np.ndarray:
    """Per-window values from per-distinct-window values; windows that hold no kept position
    (group -1) see exactly the un-occluded features and take the base value."""
    out = np.full(len(group_of_window), empty_value, dtype=np.result_type(group_values, np.asarray(empty_value)))
    hit = group_of_window >= 0
    out[hit] = group_values[group_of_window[hit]]
    return out


def disagreeing(base_label: int, window_labels: np.ndarray, window_logconf: np.ndarray | None = None,
                threshold: float = 0.0) -> np.ndarray:
    """Windows that raise the alert: another label, predicted with confidence >= threshold."""
    other = window_labels != base_label
    if threshold > 0:
        other &= np.asarray(window_logconf) >= log_threshold(threshold)
    return np.flatnonzero(other)


def certifying(label: int, labels: np.ndarray, margins: np.ndarray, logconf: np.ndarray | None, delta: float,
               threshold: float = 0.0) -> np.ndarray:
    """Per row: does this prediction hold `label` robustly enough to certify (§3.6, §7)?"""
    ok = (labels == label) & (margins > delta)
    if threshold > 0:
        ok &= np.asarray(logconf) > log_threshold(threshold) + delta
    return ok


def decide(base_label: int, base_margin: float, window_labels: np.ndarray, window_margins: np.ndarray,
           delta: float = 0.0, base_logconf: float = 0.0, window_logconf: np.ndarray | None = None,
           threshold: float = 0.0) -> Decision:
    bad = disagreeing(base_label, window_labels, window_logconf, threshold)
    if bad.size:
        return Decision("alert", int(base_label), bad)
    base_ok = certifying(base_label, np.array([base_label]), np.array([base_margin]), np.array([base_logconf]),
                         delta, threshold)[0]
    windows_ok = certifying(base_label, window_labels, window_margins, window_logconf, delta, threshold).all()
    return Decision("certified" if base_ok and windows_ok else "uncertified", int(base_label), bad)


def every_row_agrees(predict_labels, rows: np.ndarray, label: int, first_batch: int = 4, max_batch: int = 256) -> bool:
    """Whether every row (a window, or a pair) predicts `label`: rows go to `predict_labels(rows)
    -> labels` in growing batches and stop at the first that holds another label. The one
    "all windows agree" loop of the plan's and tune's scoring (argmax only: a proxy; the
    certificate itself is `decide`, with margins)."""
    lo, size = 0, first_batch
    while lo < len(rows):
        if (np.asarray(predict_labels(rows[lo:lo + size])) != label).any():
            return False
        lo, size = lo + size, min(size * 4, max_batch)
    return True
