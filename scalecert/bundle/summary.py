"""`scalecert inspect`: the facts of a bundle a user checks before deploying it."""
from __future__ import annotations


def summary(m: dict) -> dict:
    layer, windows, sin, stats = m["layer"], m["windows"], m["sin"], m.get("stats", {})
    return {
        "source": m.get("source", {}).get("file"),
        "arch": m.get("source", {}).get("arch"),
        "input": m["input"]["input_size"],
        "preprocess": {k: m["input"].get(k) for k in ("resize_short", "mean", "std")},
        "patch": m["threat_model"]["patch"],
        "layer": layer["name"],
        "layer_scope": layer.get("scope"),
        "feature_shape": [layer["channels_kept"], *layer["shape"][1:]],
        "receptive_field": layer["receptive_field"]["size"],
        "rf_stride": [layer["receptive_field"]["y"][0], layer["receptive_field"]["x"][0]],
        "footprint": windows["footprint"],
        "window_size": windows["size"],
        "occluding_stride": windows["stride"],
        "windows_per_image": windows["count"],
        "window_fill": windows.get("fill", "zero"),
        "prune_rate": sin["prune_rate"],
        "gate_tau": sin["threshold"],
        "importance": sin["importance"],
        "dead_channels": len(sin.get("dead_channels", [])),
        "dead_channels_removed": sin.get("dead_channels_removed", False),
        "margin": m["margin"],
        "threshold": m.get("decision", {}).get("threshold", 0.0),
        "plan": m.get("plan"),
        "prefix": stats.get("prefix"),
        "suffix": stats.get("suffix"),
        "full_model": stats.get("full"),
        "files": {k: v["bytes"] for k, v in m["files"].items()},
    }


def _num(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(s: dict) -> str:
    rows = [
        ("model", f"{s['source']} ({s['arch'] or 'no arch'}), input {'x'.join(map(str, s['input']))}"),
        ("preprocessing", (f"short side {s['preprocess']['resize_short']}, centre crop" if s["preprocess"]["resize_short"]
                           else "resized to the input size") +
         f"; mean {s['preprocess']['mean']}, std {s['preprocess']['std']}"),
        ("patch", f"{s['patch'][0]}x{s['patch'][1]} pixels"),
        ("layer", f"{s['layer']} [{s['layer_scope'] or 'root'}], features {'x'.join(map(str, s['feature_shape']))}"),
        ("receptive field", f"{s['receptive_field'][0]}x{s['receptive_field'][1]} px, stride {s['rf_stride'][0]}x{s['rf_stride'][1]}"),
        ("footprint", f"{s['footprint'][0]}x{s['footprint'][1]} positions (largest over all patch positions)"),
        ("windows", f"{s['window_size'][0]}x{s['window_size'][1]} at stride {s['occluding_stride']}: {s['windows_per_image']} per image, "
                    + ("holding a blank image's features" if s["window_fill"] == "blank" else "zeroed")),
        ("SIN gate", f"prune rate {s['prune_rate']:.2f}, tau {s['gate_tau']:.4g}, importance {s['importance']}"),
        ("dead channels", f"{s['dead_channels']} ({'removed from the graphs' if s['dead_channels_removed'] else 'zeroed'})"),
        ("margin delta", ", ".join(f"{k} {v:g}" for k, v in s["margin"].items())),
    ]
    for part in ("prefix", "suffix", "full_model"):
        if s.get(part):
            rows.append((part.replace("_", " "), f"{_num(s[part]['params'])} params, {_num(s[part]['macs'])} MACs"
                         + (" per window" if part == "suffix" else " per image")))
    rows.append(("files", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in s["files"].items())))
    rows.append(("alert threshold", f"confidence T = {s['threshold']:g} (docs/design.md §7)"))
    plan = s.get("plan") or {}
    rows.append(("plan", {"measured": f"measured on {plan.get('images')} calibration images ({plan.get('metric')}), "
                                      f"budget {plan.get('budget_forwards')} full forwards per image",
                          "geometric": "geometric rule (no calibration images)",
                          "given": "layer and stride given"}.get(plan.get("method"), "not recorded")))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    if plan.get("candidates"):
        text += "\n\n" + plan_table(plan["candidates"])
    return text


def plan_table(candidates: list[dict]) -> str:
    """The measured plan's candidates, one row each (<= marks an upper bound: scoring stopped
    once the candidate could not win; * marks the chosen one)."""
    from scalecert.tables import format_table

    header = ("", "layer", "features", "stride", "rate", "windows", "run", "cost (fwd)", "certified", "clean")
    rows = [("*" if c["chosen"] else "", c["layer"], "x".join(map(str, c["feature_shape"])), str(c["stride"]),
             f"{c['prune_rate']:g}", str(c["windows"]), f"{c['windows_run_mean']:.1f}", f"{c['cost_forwards']:.1f}",
             ("<= " if c["pruned"] else "") + f"{c['certified']:.1%}", f"{c['clean']:.1%}") for c in candidates]
    return format_table(header, rows)


def plot_plan(candidates: list[dict], path: str) -> None:
    """Certified rate against cost per candidate (upper bounds hollow), the chosen one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in dict.fromkeys(c["layer"] for c in candidates):
        rows = [c for c in candidates if c["layer"] == layer]
        ax.scatter([c["cost_forwards"] for c in rows], [100 * c["certified"] for c in rows], label=layer,
                   facecolors=["none" if c["pruned"] else f"C{list(dict.fromkeys(x['layer'] for x in candidates)).index(layer)}" for c in rows],
                   edgecolors=f"C{list(dict.fromkeys(x['layer'] for x in candidates)).index(layer)}")
    chosen = [c for c in candidates if c["chosen"]]
    ax.scatter([c["cost_forwards"] for c in chosen], [100 * c["certified"] for c in chosen], marker="*", s=250,
               color="gold", edgecolors="black", label="chosen", zorder=3)
    ax.set_xlabel("cost per image (full-model forwards)")
    ax.set_ylabel("certified on calibration images (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
