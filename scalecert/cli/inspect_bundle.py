"""`scalecert inspect`: the facts of a bundle a user checks before deploying it."""
from __future__ import annotations

import json

import click

from scalecert.cli.app import main


@main.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect(bundle, as_json):
    """Summarise a bundle: layer, receptive field, footprint, windows, pruning, sizes."""
    from scalecert.bundle import Bundle
    from scalecert.bundle.summary import render, summary

    info = summary(Bundle.open(bundle).manifest)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))
