"""PNG per certified image: the input, the SIN gate map and any disagreeing windows."""
from __future__ import annotations

import numpy as np


def window_to_pixels(rect, bundle) -> tuple[int, int, int, int]:
    """Feature-space window -> the pixel box its positions see (clipped to the image)."""
    h, w = bundle.image_hw
    (sy, loy, hiy), (sx, lox, hix) = bundle.receptive_field
    y0, x0, y1, x1 = rect
    return (max(0, y0 * sy + loy), max(0, x0 * sx + lox), min(h, (y1 - 1) * sy + hiy + 1), min(w, (x1 - 1) * sx + hix + 1))


def save_png(path: str, pixels: np.ndarray, result, bundle) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    fig, (ax_img, ax_gate) = plt.subplots(1, 2, figsize=(8, 4.2))
    ax_img.imshow(pixels)
    label = result.class_name or str(result.label)
    ax_img.set_title(f"{result.status.upper()}: {label}", color="green" if result.status == "certified" else "red")
    for rect in result.alert_windows:
        y0, x0, y1, x1 = window_to_pixels(rect, bundle)
        ax_img.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
    ax_gate.imshow(result.gate, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_gate.set_title(f"SIN gate: {result.kept_fraction:.0%} kept, "
                      f"{result.windows_evaluated}/{result.windows_total} windows run")
    for rect in result.alert_windows:
        y0, x0, y1, x1 = rect
        ax_gate.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
    for ax in (ax_img, ax_gate):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
