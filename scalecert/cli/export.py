"""`scalecert export` and `scalecert-export`: model -> bundle."""
from __future__ import annotations

import click

from scalecert.cli import options
from scalecert.cli.app import OneLineCommand, _guard, main


def _channel_values(ctx, param, value):
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5), refused in one line before the model loads."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, one per input channel") from None
    return values


def _resize(ctx, param, value):
    if value is None or value.lower() == "none":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r}: expected a short side in pixels, or none")
    return value


def _export_options(f):
    decorators = [
        click.argument("model", required=False),
        click.option("--arch", help="built-in architecture for a state_dict checkpoint (see --list-archs)"),
        click.option("--pretrained", is_flag=True, help="use the weights shipped for --arch (efficientnet-lite0)"),
        click.option("--input-size", help="CxHxW, e.g. 3x224x224 or 1x28x28 for grey (default: from --arch or the model)"),
        click.option("--mean", callback=_channel_values, help="per-channel mean the model was trained with, after "
                     "scaling pixels to [0, 1], e.g. 0.5,0.5,0.5 [default: the arch's, else ImageNet's, said at export]"),
        click.option("--std", callback=_channel_values, help="per-channel std, e.g. 0.5,0.5,0.5 [default: as --mean]"),
        click.option("--resize", callback=_resize, help="short side images are resized to before the centre crop to the input size, or "
                     "none (straight to the input size) [default: the arch's, else 256 for a 224 input]"),
        click.option("--patch", help="patch size: N, HxW or P% of the input area [default: 2%, or a tuned checkpoint's]"),
        click.option("--for-source", help="WIDTHxHEIGHT of the camera: --patch is then in its pixels (N, HxW or P% of the "
                     "frame) and the input patch is sized to contain its influence (docs/design.md §8)"),
        click.option("--layer", help="superficial layer: auto, an ONNX tensor or a module path [default: auto, or tuned]"),
        click.option("--prune-rate", help="fraction of feature positions gated off, or auto [default: auto; tuned: its rate]"),
        click.option("--stride", help="occluding stride in feature positions, or auto [default: auto, or tuned]"),
        click.option("--window-budget", type=int, help="most windows per image for --stride auto "
                     "[default: 100; 36 with --mode recover, whose pairs grow with the square]"),
        click.option("--max-growth", default=2.0, show_default=True, help="--layer auto: window share / patch share bound"),
        options.calib("the measured plan (layer, stride, rate), SIN importances and threshold", limit=128),
        click.option("--budget", default=37.0, show_default=True,
                     help="with --calib: cost budget of the measured plan, in full-model forwards per image "
                          "(37 = the pixel-masking baseline: the clean image and 36 masks)"),
        click.option("--threshold", default=0.0, show_default=True,
                     help="the bundle's default confidence threshold T for alerts (docs/design.md §7)"),
        options.mode("what `scalecert certify` does with this bundle by default: detect (a certified label or "
                     "an alert) or recover (a label by double masking, docs/design.md §10) "
                     "[default: detect, or the --mode a tuned checkpoint was tuned for]"),
        click.option("--fill", type=click.Choice(["auto", "zero", "blank"]),
                     help="what a window holds: blank (the layer's features of a blank image, the pixel baseline's "
                          "mask seen at the layer) or zero [default: auto: blank, zero for a tuned checkpoint, "
                          "which was tuned with zeroed windows]"),
        click.option("--channel-prune", default=0.0, show_default=True, help="fraction of least important channels removed"),
        click.option("--keep-dead-channels", is_flag=True, help="zero channels with alpha = 0 instead of cutting them out"),
        click.option("--phi", type=click.Choice(["abs", "relu"]), default="abs", show_default=True,
                     help="SIN score of a feature: abs sums alpha*|A|, relu sums alpha*max(A, 0)"),
        click.option("--classes", help="text file with one class name per line"),
        click.option("--trust-pickle", is_flag=True, help="allow unpickling a whole nn.Module (runs code from the file)"),
        options.output("bundle folder [default: MODEL stem + .scalecert]", metavar="DIR"),
        click.option("--force", is_flag=True, help="replace an existing bundle"),
        options.threads(),
        click.option("--list-archs", is_flag=True, help="list built-in architectures and exit"),
        options.as_json("print one JSON object at the end: the bundle, layer, windows, plan, margin and locality"),
        options.quiet(),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _do_export(model, arch, pretrained, input_size, mean, std, resize, patch, for_source, layer, prune_rate, stride, window_budget,
               max_growth, calib, calib_limit, budget, threshold, mode, fill, channel_prune, keep_dead_channels, phi, classes,
               trust_pickle, output, force, threads, list_archs, as_json, quiet):
    if list_archs:
        from scalecert.export.archs import REGISTRY

        if as_json:
            options.print_json([{"name": name, "input_size": list(spec.preprocess.input_size),
                                 "description": spec.description} for name, spec in REGISTRY.items()])
            return
        for name, spec in REGISTRY.items():
            click.echo(f"{name:20s} {'x'.join(map(str, spec.preprocess.input_size)):10s} {spec.description}")
        return
    from scalecert.export import ExportOptions, export_bundle
    from scalecert.export.loading import parse_input_size

    say = options.say_for(quiet, as_json)
    opts = ExportOptions(model=model, output=output, arch=arch, pretrained=pretrained,
                         input_size=parse_input_size(input_size) if input_size else None, patch=patch, for_source=for_source,
                         layer=layer,
                         prune_rate=prune_rate, stride=stride, window_budget=window_budget, max_growth=max_growth,
                         calib=calib, calib_limit=calib_limit, budget=budget, threshold=threshold, mode=mode,
                         fill=fill, channel_prune=channel_prune, remove_dead_channels=not keep_dead_channels, phi=phi,
                         classes=classes, trust_pickle=trust_pickle, force=force, echo=say, mean=mean, std=std,
                         resize=resize)
    with options.ort_threads(threads):
        path = export_bundle(opts)
    say(f"wrote {path}")
    if as_json:
        options.print_json(export_summary(path))


def export_summary(path: str) -> dict:
    """export --json: what was exported, in one small object (the whole record: manifest.json)."""
    from scalecert.bundle.manifest import read

    m = read(path, verify=False)
    layer, windows, plan = m["layer"], m["windows"], dict(m.get("plan") or {})
    if "candidates" in plan:
        plan["candidates"] = len(plan["candidates"])
    return {"bundle": path, "patch": m["threat_model"]["patch"], "mode": m.get("decision", {}).get("mode"),
            "layer": {"name": layer["name"], "scope": layer.get("scope"),
                      "features": [layer["channels_kept"], *layer["shape"][1:]]},
            "windows": {k: windows.get(k) for k in ("count", "size", "stride", "footprint", "fill")},
            "prune_rate": m["sin"]["prune_rate"], "plan": plan, "margin": m["margin"],
            "locality": m.get("locality", {})}


@main.command("export")
@_export_options
def export_cmd(**kwargs):
    """Export MODEL to a ScaleCert bundle."""
    _do_export(**kwargs)


@click.command("scalecert-export", cls=OneLineCommand)
@_export_options
def export_main(**kwargs):
    """Export MODEL to a ScaleCert bundle (same as `scalecert export`)."""
    _guard(lambda: _do_export(**kwargs))
