"""`scalecert inspect`: the facts of a bundle a user checks before deploying it."""
from __future__ import annotations

import json

import click

from scalecert.cli.app import main


@main.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--plot", "plot_path", help="write a PNG of the measured plan: certified rate against cost per candidate")
def inspect(bundle, as_json, plot_path):
    """Summarise a bundle: layer, receptive field, footprint, windows, pruning, plan, sizes."""
    from scalecert.bundle import Bundle
    from scalecert.bundle.summary import plot_plan, render, summary
    from scalecert.errors import ScaleCertError

    info = summary(Bundle.open(bundle).manifest)
    if plot_path:
        if not (info.get("plan") or {}).get("candidates"):
            raise ScaleCertError(f"{bundle}: no measured plan to plot (exported without --calib, or with the split given)")
        plot_plan(info["plan"]["candidates"], plot_path)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))
