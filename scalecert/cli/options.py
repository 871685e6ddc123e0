"""One CLI dialect: the options several commands share, declared once (README: "Options every
command shares").

One name for one thing in every command:

  --data DIR      the images the command works on and reports about (certify -o, bench, tune trains on)
  --calib DIR     images that only set the artifact's constants, never reported on (export: plan and
                  gate; build: int8 scales)
  --val DIR       tune's held-out validation images
  --labels CSV    file,index rows labelling the --data images
  -o, --output    where the command's result goes (a bundle folder, a results/report/checkpoint file)
  --threads N     ONNX Runtime intra-op threads of every session the command opens (tune: torch threads)
  --backend B     pipelines.CHOICES, default auto where the command certifies
  --precision P   bundle/manifest.PRECISIONS
  --mode M        bundle/manifest.MODES
  --json          stdout holds only JSON; human lines go to stderr
  --quiet         nothing on stdout but the --json output; errors still on stderr

Old spellings (certify --out and a positional DIR, bench --report, demo --out, tune --for) keep
working as hidden aliases: DialectCommand moves their value to the new name and prints one
`deprecated:` line on stderr.
"""
from __future__ import annotations

import contextlib
import json

import click
from click.core import ParameterSource

from scalecert.bundle.manifest import MODES, PRECISIONS
from scalecert.runtime.pipelines import CHOICES as BACKENDS

DATA_RULE = "a data folder, any layout of README 'Data folders'"


def _stack(*decorators):
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


# --- old spellings ------------------------------------------------------------------------------------


def deprecated(old: str, new: str) -> None:
    """The one line an old spelling prints (stderr; stdout stays the command's output)."""
    click.echo(f"deprecated: {old} is now {new} (the old spelling still works, for now)", err=True)


class AliasOption(click.Option):
    """A hidden old spelling of another option (`target`, spelled `new` in the message). It exposes no
    value of its own (the command never sees it, ctx.invoke passes nothing for it): what was given is
    kept in ctx.meta for DialectCommand."""

    def __init__(self, param_decls, *, target: str, new: str, **kwargs):
        super().__init__(param_decls, hidden=True, expose_value=False, callback=self._keep, **kwargs)
        self.target, self.new = target, new

    def _keep(self, ctx, param, value):
        if value is not None and ctx.get_parameter_source(self.name) is ParameterSource.COMMANDLINE:
            ctx.meta.setdefault(ALIASES_GIVEN, []).append((self, value))
        return value


ALIASES_GIVEN = "scalecert.aliases"


def alias(old: str, target: str, new: str, **kwargs):
    """Decorator: `old` keeps working for option `target` (its param name), with one deprecation line."""
    name = "deprecated_" + old.lstrip("-").replace("-", "_")
    return click.option(old, name, cls=AliasOption, target=target, new=new, **kwargs)


class DialectCommand(click.Command):
    """Every scalecert command: after parsing, an alias's value moves to its option (refused when
    both are given with different values), whatever order click processed them in."""

    def parse_args(self, ctx, args):
        rest = super().parse_args(ctx, args)
        for param, value in ctx.meta.pop(ALIASES_GIVEN, []):
            if (ctx.get_parameter_source(param.target) is ParameterSource.COMMANDLINE
                    and ctx.params.get(param.target) != value):
                raise click.UsageError(f"{param.opts[0]} and {param.new} both given; write only {param.new}", ctx)
            ctx.params[param.target] = value
            if not ctx.resilient_parsing:
                deprecated(param.opts[0], param.new)
        return rest

    def format_options(self, ctx, formatter):
        """--help: the command's own options, then the shared ones in one order for every command."""
        own, shared = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                (shared if param.name in SHARED else own).append((param.name, record))
        shared.sort(key=lambda item: SHARED.index(item[0]))
        for title, rows in (("Options", own), ("Options every command shares (README)", shared)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl([record for _, record in rows])


SHARED = ("data", "labels_csv", "val", "calib", "calib_limit", "backend", "precision", "precisions", "mode", "threads",
          "output", "as_json", "quiet")  # param names, in the order --help lists them


# --- value types: one validator each ------------------------------------------------------------------


class Threads(click.ParamType):
    """A positive whole number; 0, negatives and text are refused in one line, alike everywhere."""

    name = "N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                number = None
        if number is None or number < 1:
            flag = param.opts[0] if param is not None and param.opts else "--threads"
            raise click.UsageError(f"{flag} {value}: expected a positive whole number of threads", ctx)
        return number


class PrecisionList(click.ParamType):
    """Comma-separated precisions (bench sweeps them), each one of PRECISIONS."""

    name = "P[,P...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        values = [v.strip() for v in str(value).split(",")]
        for v in values:
            if v not in PRECISIONS:
                self.fail(f"{v!r} is not one of {', '.join(map(repr, PRECISIONS))} (comma-separated)", param, ctx)
        return values


# --- the options ----------------------------------------------------------------------------------------


def data(help: str, required: bool = False):
    """--data DIR: the images the command works on."""
    return click.option("--data", metavar="DIR", required=required, help=f"{help} ({DATA_RULE})")


def calib(help: str, limit: int):
    """--calib DIR and --calib-limit N: images that only calibrate, never reported on."""
    return _stack(
        click.option("--calib", metavar="DIR", help=f"calibration images: {help} ({DATA_RULE})"),
        click.option("--calib-limit", default=limit, show_default=True, metavar="N",
                     help="calibration images used at most"))


def labels():
    return click.option("--labels", "labels_csv", metavar="CSV",
                        help="file,index rows labelling the --data images; wins over labels.csv and class subfolders")


def output(help: str, required: bool = False, metavar: str = "FILE", aliases: tuple = ()):
    """-o/--output: where the command's result goes; `aliases` are its old spellings."""
    return _stack(click.option("-o", "--output", metavar=metavar, required=required, help=help),
                  *(alias(old, "output", "-o/--output", metavar=metavar) for old in aliases))


THREADS_HELP = "ONNX Runtime intra-op threads of every session the command opens [default: every core]"


def threads(help: str = THREADS_HELP):
    return click.option("--threads", type=Threads(), help=help)


def backend(help: str, auto: bool = True):
    """--backend: pipelines.CHOICES (ort = ort-cpu), default auto (ort-cuda where measured and available,
    else ort-cpu). Without `auto` (build, which measures a margin on a named engine): the rest, default ort-cpu."""
    choices = BACKENDS if auto else tuple(c for c in BACKENDS if c != "auto")
    return click.option("--backend", default="auto" if auto else "ort-cpu", show_default=True,
                        type=click.Choice(choices), help=help)


def precision(help: str = "bundle variant (fp16/int8 come from `scalecert build`)", sweep: bool = False):
    if sweep:
        return click.option("--precision", "precisions", type=PrecisionList(), metavar="P[,P...]",
                            help=f"{help} [default: fp32]")
    return click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS), help=help)


def mode(help: str, default: str | None = None, aliases: tuple = ()):
    return _stack(click.option("--mode", type=click.Choice(MODES), default=default, show_default=default is not None,
                               help=help),
                  *(alias(old, "mode", "--mode", type=click.Choice(MODES)) for old in aliases))


def as_json(help: str):
    return click.option("--json", "as_json", is_flag=True, help=f"{help}; human lines go to stderr")


QUIET_HELP = "print nothing on stdout but the --json output (no progress, no summary); errors still go to stderr"


def quiet(help: str = QUIET_HELP):
    return click.option("--quiet", is_flag=True, help=help)


# --- what a command prints --------------------------------------------------------------------------------


def say_for(quiet: bool, as_json: bool = False):
    """The `say` callback a command hands the library (and uses for its own human lines): stdout,
    stderr under --json (stdout holds only the JSON), nowhere under --quiet."""
    if quiet:
        return lambda line: None
    if as_json:
        return lambda line: click.echo(line, err=True)
    return click.echo


def print_json(obj) -> None:
    click.echo(json.dumps(obj))


@contextlib.contextmanager
def ort_threads(n: int | None):
    """--threads for every ONNX Runtime session opened inside (export and build open many)."""
    from scalecert.runtime.pipelines.onnxruntime import threads_default

    with threads_default(n):
        yield
