"""`scalecert inspect`: the facts of a bundle a user checks before deploying it."""
from __future__ import annotations


def summary(m: dict) -> dict:
    layer, windows, sin, stats = m["layer"], m["windows"], m["sin"], m.get("stats", {})
    return {
        "source": m.get("source", {}).get("file"),
        "arch": m.get("source", {}).get("arch"),
        "input": m["input"]["input_size"],
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
        "prune_rate": sin["prune_rate"],
        "threshold": sin["threshold"],
        "importance": sin["importance"],
        "dead_channels": len(sin.get("dead_channels", [])),
        "dead_channels_removed": sin.get("dead_channels_removed", False),
        "margin": m["margin"],
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
        ("patch", f"{s['patch'][0]}x{s['patch'][1]} pixels"),
        ("layer", f"{s['layer']} [{s['layer_scope'] or 'root'}], features {'x'.join(map(str, s['feature_shape']))}"),
        ("receptive field", f"{s['receptive_field'][0]}x{s['receptive_field'][1]} px, stride {s['rf_stride'][0]}x{s['rf_stride'][1]}"),
        ("footprint", f"{s['footprint'][0]}x{s['footprint'][1]} positions (largest over all patch positions)"),
        ("windows", f"{s['window_size'][0]}x{s['window_size'][1]} at stride {s['occluding_stride']}: {s['windows_per_image']} per image"),
        ("SIN gate", f"prune rate {s['prune_rate']:.2f}, tau {s['threshold']:.4g}, importance {s['importance']}"),
        ("dead channels", f"{s['dead_channels']} ({'removed from the graphs' if s['dead_channels_removed'] else 'zeroed'})"),
        ("margin delta", ", ".join(f"{k} {v:g}" for k, v in s["margin"].items())),
    ]
    for part in ("prefix", "suffix", "full_model"):
        if s.get(part):
            rows.append((part.replace("_", " "), f"{_num(s[part]['params'])} params, {_num(s[part]['macs'])} MACs"
                         + (" per window" if part == "suffix" else " per image")))
    rows.append(("files", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in s["files"].items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
