"""A PNG per certified image, readable at a glance: the verdict in colour (green certified, red
alert, amber neither), a heat map over the image of how many covering windows agree with the
label, the suspected region outlined on an alert, and the SIN gate map."""
from __future__ import annotations

import numpy as np

COLOURS = {"certified": "#1a9850", "alert": "#d73027", "uncertified": "#f39c12"}


def window_to_pixels(rect, bundle) -> tuple[int, int, int, int]:
    """Feature-space window -> the pixel box its positions see (clipped to the image)."""
    h, w = bundle.image_hw
    (sy, loy, hiy), (sx, lox, hix) = bundle.receptive_field
    y0, x0, y1, x1 = rect
    return (max(0, y0 * sy + loy), max(0, x0 * sx + lox), min(h, (y1 - 1) * sy + hiy + 1), min(w, (x1 - 1) * sx + hix + 1))


def agreement_map(result, bundle, windows: np.ndarray) -> np.ndarray:
    """Per pixel: the share of the windows covering it whose prediction equals the label (NaN
    where no evaluated window covers the pixel). Low values mark where hiding evidence changes
    the prediction: on an attacked image, where the patch is."""
    h, w = bundle.image_hw
    agree, cover = np.zeros((h, w)), np.zeros((h, w))
    for rect, label in zip(windows, result.window_labels):
        if label < 0:
            continue  # not evaluated (early exit)
        y0, x0, y1, x1 = window_to_pixels(rect, bundle)
        cover[y0:y1, x0:x1] += 1
        agree[y0:y1, x0:x1] += label == result.label
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cover > 0, agree / cover, np.nan)


def suspected_region(result, bundle):
    """Pixel box of the intersection of the disagreeing windows (a single patch lies in every
    window that hides it), or their bounding box when they do not intersect; None without alert."""
    boxes = [window_to_pixels(r, bundle) for r in result.alert_windows]
    if not boxes:
        return None
    y0, x0 = max(b[0] for b in boxes), max(b[1] for b in boxes)
    y1, x1 = min(b[2] for b in boxes), min(b[3] for b in boxes)
    if y0 < y1 and x0 < x1:
        return y0, x0, y1, x1
    return min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)


def save_png(path: str, pixels: np.ndarray, result, bundle, windows: np.ndarray | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    windows = bundle.windows() if windows is None else windows
    colour = COLOURS.get(result.status, "black")
    label = result.class_name or str(result.label)
    fig, (ax_img, ax_map, ax_gate) = plt.subplots(1, 3, figsize=(12, 4.4))
    fig.patch.set_facecolor("white")
    fig.suptitle(f"{result.status.upper()}: {label}  (confidence {result.confidence:.0%})", color=colour,
                 fontsize=15, fontweight="bold")
    ax_img.imshow(pixels)
    for spine in ax_img.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(6)
    region = suspected_region(result, bundle)
    if region is not None:
        y0, x0, y1, x1 = region
        ax_img.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=COLOURS["alert"],
                                           lw=2.5, linestyle="--"))
        ax_img.set_title(f"suspected patch region ({len(result.alert_windows)} windows disagree)", fontsize=9)
    else:
        ax_img.set_title("input", fontsize=9)
    ax_map.imshow(pixels, alpha=0.45)
    heat = ax_map.imshow(agreement_map(result, bundle, windows), cmap="RdYlGn", vmin=0, vmax=1, alpha=0.6)
    ax_map.set_title(f"windows agreeing with the label ({result.windows_evaluated}/{result.windows_total} run)",
                     fontsize=9)
    fig.colorbar(heat, ax=ax_map, fraction=0.046, pad=0.02)
    ax_gate.imshow(result.gate, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_gate.set_title(f"SIN gate: {result.kept_fraction:.0%} of feature positions kept", fontsize=9)
    for ax in (ax_img, ax_map, ax_gate):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
