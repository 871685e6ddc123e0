"""One CLI dialect (cli/options.py, README "Options every command shares"): every command spells a
shared option the same way, with one type and one validator; old spellings still work and say so
in one line; --quiet leaves stdout empty; --json leaves only JSON on stdout; --threads reaches
every ONNX Runtime session export and build open.

Everything runs in this process through click (CliRunner or make_context); the library is faked
where the test is about the CLI's wiring, and real where it is about what the user sees (export
and build of the tiny bundle)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

COMMANDS = ("export", "build", "certify", "bench", "tune", "doctor", "inspect", "demo")

# option -> the commands that take it (README's table says the same)
SHARED = {
    "--data": ("certify", "bench", "tune"),
    "--labels": ("certify", "bench"),
    "--calib": ("export", "build"),
    "--calib-limit": ("export", "build"),
    "--val": ("tune",),
    "--output": ("export", "certify", "bench", "tune", "demo"),
    "--threads": ("export", "build", "certify", "bench", "tune", "doctor", "demo"),
    "--backend": ("build", "certify", "doctor"),
    "--precision": ("build", "certify", "bench", "doctor"),
    "--mode": ("export", "certify", "bench", "tune"),
    "--json": ("export", "build", "certify", "bench", "tune", "doctor", "inspect"),
    "--quiet": ("export", "build", "certify", "bench", "tune", "doctor"),
}


def _command(name):
    from scalecert.cli import export_main, main

    return export_main if name == "scalecert-export" else main.commands[name]


def _option(command, flag):
    found = [p for p in _command(command).params if flag in getattr(p, "opts", ())]
    return found[0] if found else None


def _invoke(argv, **kwargs):
    from scalecert.cli import export_main, main

    if argv[0] == "scalecert-export":
        return CliRunner().invoke(export_main, [str(a) for a in argv[1:]], prog_name="scalecert-export", **kwargs)
    return CliRunner().invoke(main, [str(a) for a in argv], prog_name="scalecert", **kwargs)


# --- one declaration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", list(SHARED))
def test_every_command_spells_a_shared_option_alike(flag):
    from scalecert.bundle.manifest import MODES, PRECISIONS
    from scalecert.cli import options
    from scalecert.runtime.pipelines import CHOICES

    for command in COMMANDS:
        option = _option(command, flag)
        assert (option is not None) == (command in SHARED[flag]), (command, flag)
        if option is None:
            continue
        assert not option.hidden
        if flag == "--output":
            assert option.opts == ["-o", "--output"]
        if flag == "--threads":
            assert isinstance(option.type, options.Threads)
        if flag == "--backend":
            named = command == "build"  # measures a margin on a named engine: every choice but auto
            assert tuple(option.type.choices) == (tuple(c for c in CHOICES if c != "auto") if named else CHOICES)
            assert option.default == ("ort-cpu" if named else "auto")
        if flag == "--mode":
            assert tuple(option.type.choices) == MODES
        if flag == "--precision":
            assert (isinstance(option.type, options.PrecisionList) if command == "bench"
                    else tuple(option.type.choices) == PRECISIONS)
        if flag in ("--data", "--calib", "--val"):
            assert option.metavar == "DIR"
    assert _option("scalecert-export", flag) is not None or "export" not in SHARED[flag]


def test_help_lists_the_shared_options_together():
    for command in COMMANDS:
        result = _invoke([command, "--help"])
        assert result.exit_code == 0, result.output
        own, _, shared = result.stdout.partition("Options every command shares")
        listed = lambda text, flag: any(line.startswith((f"  {flag} ", f"  -o, {flag} "))  # noqa: E731
                                        for line in text.splitlines())  # an entry, not a wrapped help line
        for flag, commands in SHARED.items():
            if command in commands:
                assert listed(shared, flag) and not listed(own, flag), (command, flag)
        for old in ("--out ", "--report", "--for ", "--max-images"):
            assert old not in result.stdout, (command, old)  # aliases are hidden


PARSES = {
    "certify": ["B", "--data", "d", "-o", "r.jsonl", "--labels", "l.csv", "--threads", "2", "--backend", "ort",
                "--precision", "fp16", "--mode", "detect", "--json", "--quiet"],
    "bench": ["B", "--data", "d", "--labels", "l.csv", "-o", "r.json", "--threads", "2", "--precision", "fp32,int8",
              "--mode", "recover", "--json", "--quiet"],
    "tune": ["M", "--arch", "resnet20-cifar", "--data", "d", "--val", "v", "-o", "t.pt", "--threads", "2", "--mode",
             "recover", "--json", "--quiet"],
    "export": ["M", "--calib", "c", "--calib-limit", "8", "-o", "b", "--threads", "2", "--mode", "recover", "--json",
               "--quiet"],
    "build": ["B", "--calib", "c", "--calib-limit", "8", "--threads", "2", "--backend", "ort", "--precision", "int8",
              "--json", "--quiet"],
    "doctor": ["B", "--threads", "2", "--backend", "ort-cpu", "--precision", "fp16", "--json", "--quiet"],
    "inspect": ["B", "--json"],
    "demo": ["-o", "d", "--threads", "2"],
}


@pytest.mark.parametrize("command", list(PARSES))
def test_every_command_accepts_the_shared_names(command, capsys):
    args = PARSES[command]
    with _command(command).make_context(command, list(args)) as ctx:
        params = ctx.params
    assert "deprecated" not in capsys.readouterr().err
    expected = {"--data": ("data", "d"), "-o": ("output", args[args.index("-o") + 1] if "-o" in args else None),
                "--threads": ("threads", 2), "--json": ("as_json", True), "--quiet": ("quiet", True)}
    for flag, (name, value) in expected.items():
        if flag in args:
            assert params[name] == value, (flag, params)
    if command == "bench":
        assert params["precisions"] == ["fp32", "int8"] and params["mode"] == "recover"


# --- old spellings -------------------------------------------------------------------------------------

OLD = [
    ("certify", ["B", "--out", "r.jsonl", "d"], "output", "r.jsonl", "--out is now -o/--output"),
    ("bench", ["B", "--data", "d", "--report", "r.json"], "output", "r.json", "--report is now -o/--output"),
    ("demo", ["--out", "folder"], "output", "folder", "--out is now -o/--output"),
    ("tune", ["M", "--arch", "a", "--data", "d", "-o", "t.pt", "--for", "recover"], "mode", "recover",
     "--for is now --mode"),
]


@pytest.mark.parametrize("command,args,name,value,line", OLD, ids=["certify--out", "bench--report", "demo--out",
                                                                  "tune--for"])
def test_old_spellings_still_work_and_say_so(command, args, name, value, line, capsys):
    with _command(command).make_context(command, list(args)) as ctx:
        assert ctx.params[name] == value
        assert not [k for k in ctx.params if k.startswith("deprecated")]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("deprecated: ") and line in err[0], err


def test_old_and_new_spelling_together_must_agree():
    result = _invoke(["bench", "B", "--data", "d", "--report", "a.json", "-o", "b.json"])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "error: --report and -o/--output both given; write only -o/--output (see scalecert bench --help)"]


def test_old_certify_folder_spelling_certifies_the_same(tiny_bundle, photo_dir, tmp_path):
    """`certify BUNDLE DIR --out FILE` (the old spelling) and `certify BUNDLE --data DIR -o FILE`:
    the same rows; the old one prints one deprecation line per old spelling and nothing else."""
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    result = _invoke(["certify", tiny_bundle, photo_dir, "--out", old, "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    deprecations = [line for line in result.stderr.splitlines() if line.startswith("deprecated: ")]
    assert len(deprecations) == 2 and "--data DIR" in deprecations[1], result.stderr
    result = _invoke(["certify", tiny_bundle, "--data", photo_dir, "-o", new, "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "", (result.stdout, result.stderr)
    rows = [{(r["path"], r["status"], r["label"]) for r in map(json.loads, open(p))} for p in (old, new)]
    assert rows[0] == rows[1] and len(rows[0]) == 4


# --- one validator ---------------------------------------------------------------------------------------

THREADS_ARGS = {
    "scalecert-export": ["M", "-o", "b"],
    "build": ["B"],
    "certify": ["B", "a.png"],
    "bench": ["B", "--data", "d"],
    "tune": ["M", "--arch", "resnet20-cifar", "--data", "d", "-o", "t.pt"],
    "doctor": ["B"],
    "demo": [],
}


@pytest.mark.parametrize("value", ["0", "x", "-3"])
def test_bad_threads_are_refused_alike_everywhere(value):
    for command, args in THREADS_ARGS.items():
        result = _invoke([command, *args, "--threads", value])
        name = command if command == "scalecert-export" else f"scalecert {command}"
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.splitlines() == [f"error: --threads {value}: expected a positive whole number of "
                                              f"threads (see {name} --help)"], (command, result.stderr)
        assert result.stdout == ""


# --- --threads reaches ONNX Runtime; --json and --quiet -----------------------------------------------------


def test_threads_default_reaches_every_session(tiny_bundle):
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, default_threads, load_session, threads_default

    prefix, suffix = (os.path.join(tiny_bundle, f"{p}.onnx") for p in ("prefix", "suffix"))
    outside = default_threads()
    with threads_default(3):
        assert load_session(prefix).get_session_options().intra_op_num_threads == 3
        assert OrtCpuPipeline(prefix, suffix).prefix_runner.threads == 3
        assert OrtCpuPipeline(prefix, suffix, threads=1).prefix_runner.threads == 1  # an explicit count wins
    assert default_threads() == outside


def test_export_and_build_run_inside_their_threads(tiny_bundle, monkeypatch, tmp_path):
    """The CLI wraps the library calls that open sessions in --threads (faked library: no work)."""
    import scalecert.compile.build
    import scalecert.export
    from scalecert.bundle.manifest import read
    from scalecert.runtime.pipelines.onnxruntime import default_threads

    seen = {}

    def fake_export(opts):
        seen["export"] = default_threads()
        opts.say("progress line")
        return tiny_bundle

    def fake_build(bundle, **kwargs):
        seen["build"] = default_threads()
        kwargs["say"]("progress line")
        return read(tiny_bundle, verify=False)

    monkeypatch.setattr(scalecert.export, "export_bundle", fake_export)
    monkeypatch.setattr(scalecert.compile.build, "build", fake_build)
    result = _invoke(["scalecert-export", "m.pt", "--threads", "3", "--json"])
    assert result.exit_code == 0 and seen["export"] == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["bundle"] == tiny_bundle and "progress line" in result.stderr
    result = _invoke(["build", tiny_bundle, "--threads", "3", "--quiet"])
    assert result.exit_code == 0 and seen["build"] == 3 and result.stdout == "" and result.stderr == "", result.output


def test_tune_json_and_mode(monkeypatch):
    """tune --json: one object (checkpoint, epoch kept, metrics); --for still reaches the target."""
    import scalecert.training.tune

    seen = {}

    def fake_tune(opts, say):
        seen.update(target=opts.target, threads=opts.threads, quiet=opts.quiet)
        say("epoch 1: ...")
        best = {"epoch": 1, "clean_accuracy": 0.5, "certified_accuracy": 0.25}
        return {"output": opts.output, "best": best, "history": [best]}

    monkeypatch.setattr(scalecert.training.tune, "tune", fake_tune)
    result = _invoke(["tune", "m.pt", "--arch", "resnet20-cifar", "--data", "d", "-o", "t.pt", "--for", "recover",
                      "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"target": "recover", "threads": 2, "quiet": True}  # no progress bars beside the JSON
    record = json.loads(result.stdout)
    assert record == {"output": "t.pt", "last": "t.pt.last", "mode": "recover", "epoch": 1, "kept_input": False,
                      "metrics": {"clean_accuracy": 0.5, "certified_accuracy": 0.25}}
    assert "epoch 1: ..." in result.stderr and "deprecated: --for is now --mode" in result.stderr
    result = _invoke(["tune", "m.pt", "--arch", "resnet20-cifar", "--data", "d", "-o", "t.pt", "--quiet"])
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "" and seen["target"] == "detect"


def test_export_json_describes_the_bundle(tiny_checkpoint, tmp_path):
    """A real export: stdout is one JSON object that agrees with the manifest; the progress lines
    went to stderr."""
    from scalecert.bundle.manifest import read

    out = tmp_path / "b.scalecert"
    result = _invoke(["scalecert-export", tiny_checkpoint, "--arch", "resnet20-cifar", "--patch", "5", "-o", out,
                      "--threads", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = read(str(out))
    assert summary["bundle"] == str(out) and summary["layer"]["name"] == manifest["layer"]["name"]
    assert summary["windows"]["count"] == manifest["windows"]["count"] and summary["plan"]["method"] == "geometric"
    assert summary["locality"]["prefix.onnx"]["check"]["passed"] and summary["margin"] == manifest["margin"]
    assert f"wrote {out}" in result.stderr and "locality of prefix.onnx" in result.stderr


def test_build_quiet_prints_nothing_and_json_parses(tiny_bundle, tmp_path):
    bundle = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, bundle)
    result = _invoke(["build", bundle, "--precision", "fp16", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    result = _invoke(["build", bundle, "--precision", "fp16", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["precision"] == "fp16" and summary["backend"] == "ort-cpu"
    assert summary["variant"]["suffix"] == "suffix.fp16.onnx" and summary["variant"]["vs_fp32"]["top1_agreement"] > 0.9
    assert set(summary["margin"]) == {"ort-cpu-fp16"} and summary["margin"]["ort-cpu-fp16"] is not None
    assert f"updated {bundle}" in result.stderr
