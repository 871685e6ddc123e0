"""The README's commands parse as written: every `scalecert` / `scalecert-export` line in its
bash blocks names a real command with real options and valid values (click's own parsing, no
work done). Cheap enough for every CI run."""
from __future__ import annotations

import os
import re
import shlex

import pytest

from conftest import ROOT


def _commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("scalecert", "scalecert-export"):
                    out.append(" ".join(words))
    return out


COMMANDS = _commands()


def test_readme_has_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line):
    from scalecert.cli import export_main, main

    words = shlex.split(line)
    if words[0] == "scalecert-export":
        command, args = export_main, words[1:]
    else:
        assert words[1] in main.commands, f"no command {words[1]!r}"
        command, args = main.commands[words[1]], words[2:]
    with command.make_context(words[0], args) as ctx:
        assert ctx.params is not None


def test_readme_bench_sweeps_a_calibrated_bundle():
    """A pruning-rate sweep needs the bundle's threshold table, which only --calib writes."""
    exports = {shlex.split(c)[shlex.split(c).index("-o") + 1]: c for c in COMMANDS
               if c.startswith("scalecert-export") and " -o " in c}
    for line in COMMANDS:
        words = shlex.split(line)
        if words[:2] == ["scalecert", "bench"] and "--prune-rate" in words and words[2] in exports:
            assert "--calib" in exports[words[2]], exports[words[2]]
