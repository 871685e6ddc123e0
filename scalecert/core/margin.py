"""Numeric margin delta (docs/design.md §3.6): how far the engine's logits for the *same* occluded features move with
the batch they are computed in (position in the batch, batch size).

Soundness on an engine that is not bit-exact: the certificate compares p_W(x) with p_W(x') where
S_W(x) = S_W(x') exactly, but the two evaluations may sit in different batches. If every logit of
an evaluation moves by at most e between batch compositions, top-1 minus top-2 moves by at most
2e, so requiring margin >= delta = 2e (plus a safety factor) at certification time keeps the
argmax of every later evaluation of that window equal to the certified label.
"""
from __future__ import annotations

import itertools

import numpy as np

SAFETY = 4.0  # the measurement samples batch compositions; the factor covers unseen ones
REFERENCE_BATCH = 64  # the runtime's window batch (runtime/certifier.py, batch=64)
BATCH_SIZES = (1, 2, 7, 16)  # each compared with the reference
SAMPLED_WINDOWS = 63  # with the un-occluded features, one reference batch


def measure_logit_spread(suffix_infer, features: np.ndarray, windows: np.ndarray, batch_sizes=BATCH_SIZES,
                         seed: int = 0, every_row: bool = True) -> float:
    """Largest |logit difference| for identical (features, window) rows between the reference run
    (the rows in batches of REFERENCE_BATCH, as the runtime queues them) and runs in batches of
    other sizes, at shuffled positions. Each is a second, independent run of its rows, so a
    run-to-run variation shows too. `every_row`: a run over every row for each size; else one run
    over every row in batches of the sizes in turn, which still puts a row at every position of
    every size and compares every row (the reduced sample of export's check_sample, for suffixes
    whose rows are expensive)."""
    rng = np.random.default_rng(seed)
    reference = np.concatenate([suffix_infer(features, windows[lo:lo + REFERENCE_BATCH])
                                for lo in range(0, len(windows), REFERENCE_BATCH)])
    worst = 0.0
    for idx in _batches(len(windows), batch_sizes, every_row, rng):
        logits = suffix_infer(features, windows[idx])
        worst = max(worst, float(np.abs(logits - reference[idx]).max()))
    return worst


def _batches(rows: int, batch_sizes, every_row: bool, rng):
    """Row indices of each batch: for every size a shuffled run over all rows, or one shuffled run
    cut into batches of the sizes in turn."""
    if every_row:
        for size in batch_sizes:
            order = rng.permutation(rows)
            yield from (order[lo:lo + size] for lo in range(0, rows, size))
        return
    order, lo = rng.permutation(rows), 0
    for size in itertools.cycle(batch_sizes):
        if lo >= rows:
            return
        yield order[lo:lo + size]
        lo += size


def rows_evaluated(rows: int, every_row: bool = True, batch_sizes=BATCH_SIZES) -> int:
    """Suffix rows one measure_logit_spread call evaluates on `rows` sample rows."""
    return rows * (1 + (len(batch_sizes) if every_row else 1))


def delta_from_spread(spread: float) -> float:
    return 0.0 if spread == 0.0 else float(2.0 * spread * SAFETY)


def margin_sample(windows: np.ndarray) -> np.ndarray:
    """The rows the margin is measured on: the un-occluded features and up to SAMPLED_WINDOWS windows."""
    return np.concatenate([np.zeros((1, windows.shape[1]), np.int64), windows[:SAMPLED_WINDOWS]])


def measure_margin(pipeline, images: np.ndarray, windows: np.ndarray, every_row: bool = True) -> dict:
    """The margin record of one backend and precision, measured through `pipeline` (the one the
    runtime will use) on each of the normalised `images` (margin_sample's rows); the largest spread
    over the images counts."""
    sample = margin_sample(windows)
    spread = 0.0
    for i in range(len(images)):
        features, _ = pipeline.prefix(images[i:i + 1])
        spread = max(spread, measure_logit_spread(pipeline.suffix, pipeline.select(features, 0), sample,
                                                  every_row=every_row))
    return {"delta": delta_from_spread(spread), "spread": spread, "safety": SAFETY, "images": len(images),
            "windows_sampled": len(sample), "reference_batch": REFERENCE_BATCH, "batch_sizes": list(BATCH_SIZES),
            "every_row": every_row, "rows_evaluated": len(images) * rows_evaluated(len(sample), every_row)}
