"""`scalecert doctor`: the bundle's soundness and speed checked on this device (runtime/doctor.py)."""
from __future__ import annotations

import json
import sys

import click

from scalecert.bundle.manifest import PRECISIONS
from scalecert.cli.app import main
from scalecert.runtime import pipelines


@main.command()
@click.argument("bundle")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(pipelines.CHOICES),
              help="engine to check (auto: ort-cuda where measured and available, else ort-cpu)")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the prefix (default: every core)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def doctor(bundle, backend, precision, threads, as_json):
    """Check BUNDLE on this device: versions, integrity, engines, prefix locality, margin, known
    answers, latency. Exit 0 only when every probe passes; each failure says what to do."""
    from scalecert.runtime.doctor import run

    report = run(bundle, backend, precision, threads)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.render())
    sys.exit(0 if report.passed else 1)
