"""Same behaviour across refactors (docs/design.md §6): `benchmarks/same_behaviour.py check --small`
re-exports the fixed small cases with the CLI (a seeded random ResNet-20 and scikit-image photos,
fp32 and int8), certifies them, and every outcome (status, label, windows evaluated, alert windows)
must equal the recording in tests/data/same_behaviour_small.json (made before the issue-10 layout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "same_behaviour.py")
RECORDED = os.path.join(ROOT, "tests", "data", "same_behaviour_small.json")


def test_small_cases_behave_as_recorded():
    with open(RECORDED) as f:
        recorded = json.load(f)
    total = sum(len(rows) for rows in recorded.values())
    assert set(recorded) == {"tiny-r20-fp32", "tiny-r20-int8"} and total > 0
    proc = subprocess.run([sys.executable, SCRIPT, "check", RECORDED, "--small"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{total} of {total} outcomes identical", proc.stdout
