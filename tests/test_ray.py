"""`--ray` on a local Ray (num_cpus=2, one session for the module): per-image results identical to
the single-process run on real images, every image exactly once when an actor is killed mid-run
(the fault injected here, by an actor subclass), and `bench --ray` writing the same report as a local run."""
from __future__ import annotations

import json
import os

import pytest

from test_results_file import certify_folder, data_dir, local_rows, rows  # noqa: F401  (module fixtures)

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'scalecert[ray]'")

SAME = ("status", "label", "windows_evaluated", "windows_total", "alert_windows", "true_label", "error", "source",
        "bundle_sha256", "file_sha256")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def same(a: dict, b: dict) -> bool:
    return all(a.get(key) == b.get(key) for key in SAME)


def test_ray_rows_equal_the_local_run(local_rows, tiny_bundle, data_dir, tmp_path):
    """Through the command line (`certify DIR --out --ray --workers 2`, in this process so it joins
    the module's Ray): exit 1 for the one broken image, every other image certified."""
    from conftest import in_process

    out = str(tmp_path / "ray.jsonl")
    with pytest.raises(SystemExit) as exited:
        in_process("certify", tiny_bundle, "--data", data_dir, "-o", out, "--threads", "1", "--quiet", "--ray",
                   "--workers", "2")
    assert exited.value.code == 1
    got = rows(out)
    assert sorted(r["path"] for r in got) == sorted(r["path"] for r in local_rows)  # each image once
    local = {r["path"]: r for r in local_rows}
    assert all(same(r, local[r["path"]]) for r in got), [r["path"] for r in got if not same(r, local[r["path"]])]
    assert {r["status"] for r in got} >= {"error", "alert"}


def test_killed_actor_still_yields_every_image_once(local_rows, tiny_bundle, data_dir, tmp_path, monkeypatch):
    """One actor dies (os._exit) on its 2nd batch; Ray restarts it and retries the batch. The run
    also resumes an output that already holds 6 rows: those stay, byte for byte."""
    from scalecert.evaluation import distributed

    marker = str(tmp_path / "actor-exited")

    class DiesOnce(distributed.FolderActor):
        """Exits its process on its 2nd batch, once: the marker is created exclusively, so the
        restarted actor goes on. Defined here, so Ray ships it to the workers by value."""

        calls = 0

        def __call__(self, batch: dict) -> dict:
            self.calls += 1
            if self.calls == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(distributed.Pool, "folder_actor", DiesOnce)
    out = tmp_path / "ray.jsonl"
    done = "".join(json.dumps(r) + "\n" for r in local_rows[:6])
    out.write_text(done)
    counts = certify_folder(tiny_bundle, data_dir, str(out), ray_address="auto", workers=2)
    assert os.path.exists(marker), "the fault was never injected: this test would prove nothing"
    assert counts["skipped"] == 6 and counts["written"] == 19
    assert out.read_text().startswith(done)
    got = rows(str(out))
    assert sorted(r["path"] for r in got) == sorted(r["path"] for r in local_rows)
    local = {r["path"]: r for r in local_rows}
    assert all(same(r, local[r["path"]]) for r in got)


def test_bench_on_ray_writes_the_same_report(tiny_bundle, data_dir):
    from scalecert.evaluation.bench import run_bench

    here = run_bench(tiny_bundle, data_dir, threads=1, quiet=True)
    there = run_bench(tiny_bundle, data_dir, threads=1, quiet=True, ray_address="auto", workers=2)
    assert set(here) == set(there) and here["schema"] == there["schema"]
    assert here["ran_on"]["where"] == "local" and there["ran_on"]["where"] == "ray"
    assert there["ran_on"]["workers"] == 2 and there["configs"][0]["ran_on"]["wall_s"] > 0
    a, b = here["configs"][0], there["configs"][0]
    assert set(a) == set(b)
    for key in ("images", "clean_accuracy", "certified_accuracy", "false_alert_rate", "windows_evaluated_mean",
                "thresholds", "kept_fraction_mean", "windows_total"):
        assert a[key] == b[key], key
    assert here["windows_evaluated_hist"] == there["windows_evaluated_hist"]
    assert b["latency_ms_median"] > 0 and b["images_per_s"] > 0  # the workers' own timings
    assert here["errors"] == there["errors"] and len(here["errors"]) == 1
