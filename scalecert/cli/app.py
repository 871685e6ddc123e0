"""The `scalecert` command group and its error guard: one line and a non-zero exit for bad input."""
from __future__ import annotations

import os
import sys

import click

from scalecert.errors import ScaleCertError


class _Group(click.Group):
    def invoke(self, ctx):
        return _guard(lambda: super(_Group, self).invoke(ctx))


def _guard(call):
    """One clear line and a non-zero exit for bad input; a traceback only with SCALECERT_DEBUG=1."""
    try:
        return call()
    except ScaleCertError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SCALECERT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        click.echo(f"error: internal failure ({type(exc).__name__}: {first}); rerun with SCALECERT_DEBUG=1 "
                   "for the traceback", err=True)
        sys.exit(3)


@click.group(cls=_Group)
@click.version_option(package_name="scalecert")
def main():
    """Certified detection of adversarial patches (ScaleCert), compiled to ONNX bundles."""
