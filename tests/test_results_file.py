"""`certify --data DIR -o FILE` in one process: one row per image (error rows included), resume after a
killed run (torn last line), Parquet, and `--ray` without Ray installed. Real images, real bundle."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, cifar_files, run_cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, photo_files) -> str:
    """An ImageFolder tree: 2 CIFAR-10 test JPEGs per class, the real photos in airplane/, and a
    broken file in cat/ (its row must be an error row)."""
    root = tmp_path_factory.mktemp("folder-data")
    for path in cifar_files(2):
        cls = os.path.basename(os.path.dirname(path))
        os.makedirs(root / cls, exist_ok=True)
        shutil.copy(path, root / cls / os.path.basename(path))
    for path in photo_files:
        shutil.copy(path, root / "airplane" / os.path.basename(path))
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    return str(root)


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_rows(path: str) -> list[dict]:
    """A results file's rows, .jsonl or .parquet."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return rows(path)


def certify_folder(bundle, data, out, **kw):
    from scalecert.evaluation.folder import certify_folder as run

    return run(bundle, data, out, threads=1, quiet=True, log=lambda line: None, **kw)


@pytest.fixture(scope="module")
def local_rows(tiny_bundle, data_dir, tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("local") / "results.jsonl")
    counts = certify_folder(tiny_bundle, data_dir, out)
    assert counts["written"] == counts["images"] == 25 and counts["skipped"] == 0
    return rows(out)


def test_one_row_per_image_as_certify_json(local_rows, tiny_bundle, data_dir):
    from scalecert.runtime import Certifier

    assert len({r["path"] for r in local_rows}) == len(local_rows) == 25
    broken = [r for r in local_rows if r["status"] == "error"]
    assert [r["path"] for r in broken] == [os.path.join("cat", "broken.jpg")] and "cannot decode" in broken[0]["error"]
    by_path = {r["path"]: r for r in local_rows}
    with Certifier.load(tiny_bundle, threads=1) as cert:  # the same fields as `certify --json`, plus path/label
        for rel in (os.path.join("airplane", "coffee.png"), os.path.join("dog", "0000.jpg")):
            expected = cert.certify(os.path.join(data_dir, rel)).to_json()
            row = by_path[rel]
            assert set(row) == set(expected) | {"path", "true_label", "bundle_sha256", "file_sha256"}
            for key in ("status", "label", "windows_evaluated", "windows_total", "alert_windows", "base_margin"):
                assert row.get(key) == expected.get(key), (rel, key)
    classes = sorted(os.listdir(data_dir))
    assert all(r["true_label"] == classes.index(r["path"].split(os.sep)[0]) for r in local_rows)


def test_resume_after_a_killed_run(local_rows, tiny_bundle, data_dir, tmp_path):
    """A run killed mid-line: the finished rows stay, the torn line is dropped, the rest is done once."""
    out = tmp_path / "results.jsonl"
    first = local_rows[:9]
    text = "".join(json.dumps(r) + "\n" for r in first)
    out.write_text(text + json.dumps(local_rows[9])[:40])  # torn last line
    counts = certify_folder(tiny_bundle, data_dir, str(out))
    assert counts["skipped"] == 9 and counts["written"] == 16
    again = rows(str(out))
    assert out.read_text().startswith(text)  # earlier rows untouched, byte for byte
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in local_rows)
    expected = {r["path"]: (r["status"], r.get("label"), r.get("windows_evaluated")) for r in local_rows}
    assert {r["path"]: (r["status"], r.get("label"), r.get("windows_evaluated")) for r in again} == expected
    assert certify_folder(tiny_bundle, data_dir, str(out))["written"] == 0  # nothing left: nothing redone


def test_parquet_output_and_resume(local_rows, tiny_bundle, data_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "results.parquet"
    journal = tmp_path / ".results.parquet.partial.jsonl"
    journal.write_text("".join(json.dumps(r) + "\n" for r in local_rows[:5]))  # a killed run's rows
    counts = certify_folder(tiny_bundle, data_dir, str(out))
    assert counts["skipped"] == 5 and counts["written"] == 20 and not journal.exists()
    table = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in table) == sorted(r["path"] for r in local_rows)
    local = {r["path"]: r for r in local_rows}
    assert all(r["status"] == local[r["path"]]["status"] and r["label"] == local[r["path"]].get("label")
               for r in table)


def test_refuses_a_file_that_is_no_results_file(tiny_bundle, data_dir, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\nmore\n")
    proc = run_cli("scalecert", "certify", tiny_bundle, "--data", data_dir, "-o", notes, "--quiet")
    assert proc.returncode == 2 and "not a scalecert results row" in proc.stderr
    assert notes.read_text() == "my notes\nmore\n"
    proc = run_cli("scalecert", "certify", tiny_bundle, "--data", data_dir, "-o", tmp_path / "r.csv")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and ".jsonl or .parquet" in proc.stderr


def test_ray_missing_gives_one_line(tiny_bundle, data_dir, tmp_path):
    """Ray's import blocked in a fresh interpreter: `--ray` fails in one line naming the extra, and
    writes nothing."""
    out = tmp_path / "r.jsonl"
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, *a):\n"
               "        if name == 'ray' or name.startswith('ray.'):\n            raise ImportError(name)\n"
               "sys.meta_path.insert(0, Block())\nfrom scalecert.cli import main\nmain()\n")
    for args in (["certify", tiny_bundle, "--data", data_dir, "-o", str(out), "--ray"],
                 ["bench", tiny_bundle, "--data", data_dir, "--ray"]):
        proc = subprocess.run([sys.executable, "-c", blocker, *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "pip install 'scalecert[ray]'" in proc.stderr
        assert not out.exists()


def test_pool_sizing_on_fake_gpu_cluster_resources(tiny_bundle):
    """GPU actors cannot be run here (no GPU): the pool's shape is checked against cluster
    resources as Ray would report them for a 4-GPU, 8-CPU cluster (faked dicts, no Ray needed)."""
    from scalecert.bundle import Bundle
    from scalecert.errors import ScaleCertError
    from scalecert.evaluation.distributed import actor_backend, pool_shape

    gpus = {"cluster_cpus": 8.0, "cluster_gpus": 4.0}
    assert pool_shape("ort-cuda", None, None, gpus) == (4, 1.0, 1.0)
    assert pool_shape("ort-cpu", None, 2, gpus) == (4, 2.0, 0.0)
    assert pool_shape("ort-cpu", 3, None, gpus) == (3, 1.0, 0.0)
    with pytest.raises(ScaleCertError, match="room for 4 GPU actors"):
        pool_shape("trt", 5, None, gpus)
    with pytest.raises(ScaleCertError, match="room for 2 1-core actors"):
        pool_shape("ort-cpu", 3, None, {"cluster_cpus": 2.0, "cluster_gpus": 0})
    bundle = Bundle.open(tiny_bundle)  # no ort-cuda margin measured: auto stays on CPU actors, ort-cuda is refused
    assert actor_backend("auto", "fp32", bundle, cluster_gpus=4) == "ort-cpu"
    with pytest.raises(ScaleCertError, match="no numeric margin measured for ort-cuda"):
        actor_backend("ort-cuda", "fp32", bundle, cluster_gpus=4)


def test_ray_flag_before_a_path_is_refused(tiny_bundle, data_dir, tmp_path):
    proc = run_cli("scalecert", "certify", tiny_bundle, "--data", data_dir, "-o", tmp_path / "r.jsonl", "--ray", data_dir)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a cluster address" in proc.stderr
    proc = run_cli("scalecert", "certify", tiny_bundle, data_dir, "--ray")
    assert proc.returncode == 2 and "add --data DIR -o" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r.jsonl").exists()


# --- rows keyed by bundle and file content (no ../shared: generated images, scikit-image's photos) --

TIMING = ("latency_ms", "prefix_ms", "suffix_ms")


def photo_jpeg(path, name="chelsea") -> None:
    """A 640x480 JPEG photo: scikit-image's, resized."""
    from PIL import Image
    from skimage import data

    Image.fromarray(getattr(data, name)()).resize((640, 480), Image.BILINEAR).save(path, quality=90)


def write_photo_folder(root) -> str:
    """An ImageFolder tree: a 640x480 JPEG photo and a 16-bit PNG in cats/, a small generated PNG
    and a broken file in other/."""
    import numpy as np
    from PIL import Image

    os.makedirs(root / "cats")
    os.makedirs(root / "other")
    photo_jpeg(root / "cats" / "photo.jpg")
    ramp = np.add.outer(np.arange(48) * 900, np.arange(64) * 300).astype(np.uint16)  # up to 61200: 16 bits used
    wide = Image.fromarray(ramp)
    assert wide.mode == "I;16"
    wide.save(root / "cats" / "wide.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "other" / "small.png")
    (root / "other" / "broken.jpg").write_bytes(b"not an image")
    return str(root)


def logged_run(bundle, data, out, **kw) -> tuple[dict, str]:
    from scalecert.evaluation.folder import certify_folder as run

    lines = []
    counts = run(bundle, data, out, threads=1, quiet=True, log=lines.append, **kw)
    return counts, lines[0]


@pytest.fixture
def photo_folder(tmp_path) -> str:
    return write_photo_folder(tmp_path / "photos")


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
def test_a_replaced_image_is_certified_again(tiny_bundle, photo_folder, tmp_path, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow.parquet")
    out = str(tmp_path / f"results{ext}")
    counts, line = logged_run(tiny_bundle, photo_folder, out)
    assert counts["written"] == counts["images"] == 4 and counts["skipped"] == counts["replaced"] == 0
    assert "0 rows reused, 0 replaced" in line and "4 new" in line
    before = {r["path"]: r for r in read_rows(out)}
    photo_jpeg(os.path.join(photo_folder, "cats", "photo.jpg"), "astronaut")  # same name, another image
    counts, line = logged_run(tiny_bundle, photo_folder, out)
    assert (counts["skipped"], counts["written"], counts["replaced"]) == (3, 1, 1)
    assert "3 rows reused, 1 replaced (1 changed file, 0 other bundle or settings), 0 new" in line
    after = read_rows(out)
    assert len(after) == 4 and len({r["path"] for r in after}) == 4  # the old row is gone
    key = os.path.join("cats", "photo.jpg")
    new = next(r for r in after if r["path"] == key)
    with open(os.path.join(photo_folder, key), "rb") as f:
        assert new["file_sha256"] == hashlib.sha256(f.read()).hexdigest() != before[key]["file_sha256"]
    assert {r["path"]: r for r in after if r["path"] != key} == {p: r for p, r in before.items() if p != key}


def test_another_bundle_or_setting_certifies_every_image_again(tiny_bundle, photo_folder, tmp_path):
    """The same model re-exported (its manifest differs only in `created`), then another threshold:
    every row is replaced each time, error rows included."""
    out = str(tmp_path / "results.jsonl")
    logged_run(tiny_bundle, photo_folder, out)
    first = {r["path"]: r["bundle_sha256"] for r in read_rows(out)}
    again = str(tmp_path / "bundle")
    shutil.copytree(tiny_bundle, again)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    manifest["created"] = "2001-01-01T00:00:00"
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    counts, line = logged_run(again, photo_folder, out)
    assert (counts["skipped"], counts["written"], counts["replaced"]) == (0, 4, 4)
    assert "0 rows reused, 4 replaced (0 changed file, 4 other bundle or settings), 0 new" in line
    second = {r["path"]: r["bundle_sha256"] for r in read_rows(out)}
    assert second.keys() == first.keys() and len(set(second.values())) == 1 and not set(second.values()) & set(
        first.values())
    counts, _ = logged_run(again, photo_folder, out, threshold=0.5)
    assert (counts["skipped"], counts["replaced"]) == (0, 4)
    assert len(read_rows(out)) == 4


def test_an_unchanged_rerun_reuses_every_row(tiny_bundle, photo_folder, tmp_path):
    out = tmp_path / "results.jsonl"
    logged_run(tiny_bundle, str(photo_folder), str(out))
    text = out.read_text()
    counts, line = logged_run(tiny_bundle, str(photo_folder), str(out))
    assert (counts["skipped"], counts["written"], counts["replaced"]) == (4, 0, 0)
    assert "4 rows reused, 0 replaced (0 changed file, 0 other bundle or settings), 0 new" in line
    assert out.read_text() == text  # not rewritten
    assert counts["error"] == 1 and sum(counts.get(s, 0) for s in ("certified", "alert", "uncertified")) == 3


def test_error_rows_are_keyed_and_old_rows_are_stale(tiny_bundle, photo_folder, tmp_path):
    """A fixed broken file is certified again; a row without the keys (an older scalecert's) is
    replaced; of two rows for an image (a killed run appended the second) the last counts, and the
    next finished run leaves one row per image."""
    out = tmp_path / "results.jsonl"
    logged_run(tiny_bundle, photo_folder, str(out))
    photo, wide, broken, small = (os.path.join(*p) for p in (("cats", "photo.jpg"), ("cats", "wide.png"),
                                                               ("other", "broken.jpg"), ("other", "small.png")))
    done = {r["path"]: r for r in read_rows(str(out))}
    assert done[broken]["status"] == "error"
    assert done[broken]["file_sha256"] == hashlib.sha256(b"not an image").hexdigest()
    photo_jpeg(os.path.join(photo_folder, broken))  # fixed
    unkeyed = {k: v for k, v in done[wide].items() if k not in ("bundle_sha256", "file_sha256")}
    earlier = {**done[photo], "label": 999}
    out.write_text("".join(json.dumps(r) + "\n" for r in (earlier, done[photo], unkeyed, done[broken], done[small])))
    counts, line = logged_run(tiny_bundle, photo_folder, str(out))
    assert (counts["skipped"], counts["written"], counts["replaced"]) == (2, 2, 2)
    assert "2 rows reused, 2 replaced (1 changed file, 1 other bundle or settings), 0 new" in line
    after = {r["path"]: r for r in read_rows(str(out))}
    assert len(read_rows(str(out))) == 4 and after[photo] == done[photo] and after[small] == done[small]
    assert after[broken]["status"] != "error" and "bundle_sha256" in after[wide]


def test_rows_equal_certify_json_from_source_files(tiny_bundle, photo_folder, tmp_path):
    """A 640x480 JPEG's row reports its 640x480 source, a 16-bit PNG's no bounded source patch:
    the row is `certify FILE --json`'s object, timings aside, plus the row's keys."""
    out = str(tmp_path / "results.jsonl")
    logged_run(tiny_bundle, photo_folder, out)
    by_path = {r["path"]: r for r in read_rows(out)}
    files = [os.path.join(photo_folder, "cats", name) for name in ("photo.jpg", "wide.png")]
    proc = run_cli("scalecert", "certify", tiny_bundle, *files, "--json", "--threads", "1", check=True)
    expected = [json.loads(line) for line in proc.stdout.splitlines()]
    assert expected[0]["source"]["size"] == [480, 640] and expected[1]["source"]["covered_patch"] is None
    for path, want in zip(files, expected):
        row = dict(by_path[os.path.relpath(path, photo_folder)])
        with open(path, "rb") as f:
            assert row.pop("file_sha256") == hashlib.sha256(f.read()).hexdigest()
        assert row.pop("true_label") == 0 and len(row.pop("bundle_sha256")) == 64
        assert row.pop("path") == os.path.relpath(path, photo_folder)
        assert {k: v for k, v in row.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}
