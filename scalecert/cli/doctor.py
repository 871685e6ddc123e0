"""`scalecert doctor`: the bundle's soundness and speed checked on this device (runtime/doctor.py)."""
from __future__ import annotations

import json
import sys

import click

from scalecert.cli import options
from scalecert.cli.app import main


@main.command()
@click.argument("bundle")
@options.backend(help="engine to check (auto: ort-cuda where measured and available, else ort-cpu)")
@options.precision()
@options.threads("ONNX Runtime intra-op threads for the prefix [default: every core]")
@options.as_json("print the report as JSON")
@options.quiet("print nothing on stdout but the --json output; each failed check is one error: line on stderr")
def doctor(bundle, backend, precision, threads, as_json, quiet):
    """Check BUNDLE on this device: versions, integrity, engines, prefix locality, margin, known
    answers, latency. Exit 0 only when every probe passes; each failure says what to do."""
    from scalecert.runtime.doctor import run

    report = run(bundle, backend, precision, threads)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        click.echo(report.render())
    else:
        failed = [c for c in report.checks if c.ok is False]
        for check in failed:
            click.echo(f"error: {check.name}: {check.detail}" + (f" -> {check.fix}" if check.fix else ""), err=True)
        if not report.passed and not failed:
            click.echo("error: no known answer was confirmed on this device", err=True)
    sys.exit(0 if report.passed else 1)
