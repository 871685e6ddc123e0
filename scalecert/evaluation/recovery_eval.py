"""Certified recovery evaluated over any pair predictor: the bundle's feature windows (BundleRecovery)
or PatchCleanser's pixel masks (evaluation/baseline.py). Every decision is core/recovery.py's.

A predictor is a function `predict(pairs) -> (labels, thin)` for a (k, 2) array of window (or mask)
index pairs: the labels with both windows zeroed ((i, i): window i alone, the first round) and a
boolean per row where the top-1 minus top-2 logit is below the engine's numeric margin.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from scalecert.core import recovery


def pair_index(n: int) -> np.ndarray:
    """(n(n+1)/2, 2) pairs i <= j: a pair and its mirror zero the same union, so each runs once;
    (i, i) is window i alone (the first round). 36 windows -> 666 pairs."""
    return np.stack(np.triu_indices(n), 1)


def symmetric_map(n: int, pairs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(n, n) map from the values of pairs i <= j, mirrored."""
    values = np.asarray(values)
    out = np.zeros((n, n), values.dtype)
    out[pairs[:, 0], pairs[:, 1]] = values
    out[pairs[:, 1], pairs[:, 0]] = values
    return out


def first_round_pairs(n: int) -> np.ndarray:
    return np.repeat(np.arange(n), 2).reshape(n, 2)


def second_round_pairs(n: int, i: int) -> np.ndarray:
    return np.stack([np.full(n, i), np.arange(n)], 1)


@dataclass(frozen=True)
class Outcome:
    label: int
    case: str  # core/recovery.Recovery.case
    certified: bool | None  # None: certification not asked (the fast path)
    evaluated: int  # rows (windows or pairs) predicted
    latency_ms: float


def fast_path(n: int, predict) -> Outcome:
    """What a device runs: the first round, and a second round for a disagreer only while the
    decision needs it (core/recovery.double_masking stops at the first unanimous disagreer)."""
    start = time.perf_counter()
    first, _ = predict(first_round_pairs(n))
    evaluated = [n]

    class SecondRound(dict):
        def __missing__(self, i):
            evaluated[0] += n
            self[i] = predict(second_round_pairs(n, i))[0]
            return self[i]

    decided = recovery.double_masking(first, SecondRound())
    return Outcome(decided.label, decided.case, None, evaluated[0], (time.perf_counter() - start) * 1e3)


def certification(n: int, predict, batch: int = 1 << 30, early_exit: bool = False,
                  fast: Outcome | None = None) -> Outcome:
    """Every pair i <= j (batches of `batch` rows): the double-masking label from those predictions
    and whether every pair predicts it with a margin the engine cannot flip. With early_exit the
    pairs stop at the first that breaks the certificate (a disagreeing first round breaks it before
    any pair runs; the label is then the fast path's, `fast` when the caller already has it); the
    label and the verdict are the same as without (the test suite checks)."""
    start = time.perf_counter()
    first, first_thin = predict(first_round_pairs(n))
    evaluated = n
    if early_exit:
        label, disagreers = recovery.first_round_disagreers(first)
        if disagreers.size or first_thin.any():
            outcome = fast if fast is not None else fast_path(n, predict)
            return Outcome(outcome.label, outcome.case, False, evaluated + (outcome.evaluated if fast is None else 0),
                           (time.perf_counter() - start) * 1e3)
    labels = np.diag(first).astype(np.int64)
    thin = np.diag(first_thin).astype(bool)
    off = np.stack(np.triu_indices(n, 1), 1)
    for lo in range(0, len(off), batch):
        part = off[lo:lo + batch]
        predicted, part_thin = predict(part)
        evaluated += len(part)
        labels[part[:, 0], part[:, 1]] = labels[part[:, 1], part[:, 0]] = predicted
        thin[part[:, 0], part[:, 1]] = thin[part[:, 1], part[:, 0]] = part_thin
        if early_exit and ((predicted != first[0]).any() or part_thin.any()):
            return Outcome(int(first[0]), "agreed", False, evaluated, (time.perf_counter() - start) * 1e3)
    decided = recovery.double_masking(first, {i: labels[i] for i in range(n)})
    certified = recovery.certified_recovery(labels, decided.label, thin)
    return Outcome(decided.label, decided.case, certified, evaluated, (time.perf_counter() - start) * 1e3)


class BundleRecovery:
    """Recovery over a bundle's window family through its own pipelines (`Certifier`): a pair (i, j)
    is one suffix row with both rectangles (docs/design.md §10), as the runtime's Recoverer runs it.
    Every pair of the request runs (no dedupe on the gate, which the Recoverer adds): for a bundle
    with a gate the latencies here are an upper bound."""

    def __init__(self, cert):
        self.cert = cert
        self.windows = cert.windows
        self.n = len(self.windows)

    def predictor(self, pixels: np.ndarray):
        """predict(pairs) for one uint8 HxWx3 image (the prefix runs once, here)."""
        from scalecert.core import decision

        features, _ = self.cert.features(pixels[None])
        features = self.cert.pipeline.select(features, 0)

        def predict(pairs: np.ndarray):
            pairs = np.asarray(pairs)
            if (pairs[:, 0] == pairs[:, 1]).all():  # first round: one window per row, as detection
                logits = self.cert.window_logits(features, self.windows[pairs[:, 1]])
            else:
                logits = self.cert.window_logits(features, self.windows[pairs])  # (k, 2, 4): one row per pair
            labels, margins = decision.top2_margin(logits)
            return labels, margins <= self.cert.delta

        return predict
