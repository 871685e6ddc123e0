"""The `scalecert` command group and its error guard: one line and a non-zero exit for bad input."""
from __future__ import annotations

import os
import sys

import click

from scalecert.cli.options import DialectCommand
from scalecert.errors import OptionError, ScaleCertError


class OneLineErrors:
    """click's own errors (bad choice, bad type, missing argument, unknown option) as the same one
    `error: ...` line and exit 2 as every other bad input, instead of click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except BrokenPipeError:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _Group(OneLineErrors, click.Group):
    command_class = DialectCommand  # every subcommand speaks the dialect of cli/options.py

    def invoke(self, ctx):
        return _guard(lambda: super(_Group, self).invoke(ctx))


class OneLineCommand(OneLineErrors, DialectCommand):
    pass


# The library names a bad value in its own words ("threshold 1.5: ..."); the CLI names the flag.
FLAGS = {"threshold": "--threshold", "patch": "--patch", "source patch": "--source-patch", "mode": "--mode",
         "batch": "--batch", "stride": "--stride", "source size": "--for-source",
         "output": "-o/--output"}


def user_message(exc: ScaleCertError) -> str:
    """The one line the CLI prints: an OptionError's leading library term becomes the flag's name."""
    text = str(exc)
    if isinstance(exc, OptionError):
        for term in sorted(FLAGS, key=len, reverse=True):
            if text.startswith(term + " "):
                return FLAGS[term] + text[len(term):]
    return text


def _guard(call):
    """One clear line and a non-zero exit for bad input; a traceback only with SCALECERT_DEBUG=1."""
    try:
        return call()
    except ScaleCertError as exc:
        click.echo(f"error: {user_message(exc)}", err=True)
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
