"""Numeric margin delta (docs/design.md §3.6): how far the engine's logits for the *same* occluded features move with
the batch they are computed in (position in the batch, batch size).

Soundness on an engine that is not bit-exact: the certificate compares p_W(x) with p_W(x') where
S_W(x) = S_W(x') exactly, but the two evaluations may sit in different batches. If every logit of
an evaluation moves by at most e between batch compositions, top-1 minus top-2 moves by at most
2e, so requiring margin >= delta = 2e (plus a safety factor) at certification time keeps the
argmax of every later evaluation of that window equal to the certified label.
"""
from __future__ import annotations

import numpy as np

SAFETY = 4.0  # the measurement samples batch compositions; the factor covers unseen ones
BATCH_SIZES = (1, 2, 7, 16, 64)


def measure_logit_spread(suffix_infer, features: np.ndarray, windows: np.ndarray,
                         batch_sizes=BATCH_SIZES, seed: int = 0) -> float:
    """Largest |logit difference| for identical (features, window) inputs evaluated alone, at
    different positions of batches of several sizes, in shuffled orders. The batches of size 1 are
    the `alone` run itself: every other batch is a second, independent run of its rows, so a
    run-to-run variation shows in those comparisons too, and they are not run twice (each row of a
    ViT-B/16 suffix costs 0.2 s on two cores)."""
    rng = np.random.default_rng(seed)
    alone = np.concatenate([suffix_infer(features, windows[i:i + 1]) for i in range(len(windows))])
    worst = 0.0
    for size in [s for s in batch_sizes if s > 1]:
        order = rng.permutation(len(windows))
        for lo in range(0, len(order), size):
            idx = order[lo:lo + size]
            logits = suffix_infer(features, windows[idx])
            worst = max(worst, float(np.abs(logits - alone[idx]).max()))
    return worst


def delta_from_spread(spread: float) -> float:
    return 0.0 if spread == 0.0 else float(2.0 * spread * SAFETY)


def measure_margin(pipeline, images: np.ndarray, windows: np.ndarray) -> dict:
    """The margin record of one backend and precision, measured through `pipeline` (the one the
    runtime will use) on each of the normalised `images`: the un-occluded features and up to 63
    windows; the largest spread over the images counts."""
    sample = np.concatenate([np.zeros((1, 4), np.int64), windows[:63]])
    spread = 0.0
    for i in range(len(images)):
        features, _ = pipeline.prefix(images[i:i + 1])
        spread = max(spread, measure_logit_spread(pipeline.suffix, pipeline.select(features, 0), sample))
    return {"delta": delta_from_spread(spread), "spread": spread, "safety": SAFETY, "images": len(images),
            "windows_sampled": len(sample), "batch_sizes": list(BATCH_SIZES)}
