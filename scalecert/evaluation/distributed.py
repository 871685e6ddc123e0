"""Certification and benchmarks on a Ray cluster (`--ray`), with results identical to one process.

Ray is optional (`pip install 'scalecert[ray]'`) and imported only here, lazily; nothing in
scalecert.runtime imports this module. Ray Data reads the images (`read_binary_files`, so the data
folder must be at the same path on every node: a shared filesystem, see docs/cluster.md) and runs
`map_batches` over a fixed actor pool (`compute=ActorPoolStrategy(size=N)`: the API since Ray 2.51,
where `concurrency=` is deprecated). Each actor unpacks the bundle, which travels in the object store
(no shared filesystem needed for it), opens it once with every hash verified on the worker, and holds
one Certifier for its life. An actor that dies is restarted and its batch retried (Ray Data's actor
pools default to max_restarts=-1, max_task_retries=-1); the driver deduplicates rows by the image's
relative path (evaluation/results_file.py), so every image appears exactly once. A worker keys each
row by the bundle it opened and the bytes it read (bundle_sha256, file_sha256).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import time

import numpy as np

from scalecert.errors import ScaleCertError

INSTALL = "pip install 'scalecert[ray]'"
GPU_BACKENDS = ("ort-cuda", "trt")
IMAGES_PER_BATCH = 8  # images per map_batches call: small, so a retried batch redoes little work


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ScaleCertError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str) -> dict:
    """Join the cluster: "auto" is RAY_ADDRESS's cluster or else a local one started now (all this
    machine's cores); anything else is a cluster address (host:port, ray://host:10001). A session
    already open in this process (a test's) is used as it is. -> where it ran, for reports."""
    import logging

    ray = require_ray()
    if not ray.is_initialized():
        target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
        try:
            if target:
                ray.init(address=target, logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ScaleCertError(f"--ray {target or 'local'}: cannot connect to the Ray cluster ({first})") from None
    resources = ray.cluster_resources()
    return {"where": "ray", "address": address if address != "auto" else (os.environ.get("RAY_ADDRESS") or "local"),
            "ray": ray.__version__, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cluster_cpus": resources.get("CPU", 0), "cluster_gpus": resources.get("GPU", 0)}


def _quiet_progress(quiet: bool) -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = not quiet
    context.print_on_execution_start = not quiet
    if quiet:
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)


def pack_bundle(bundle_dir: str) -> bytes:
    """The bundle folder as tar bytes, to travel in the object store."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(bundle_dir, arcname="bundle")
    return buffer.getvalue()


def unpack_bundle(data: bytes) -> str:
    """On a worker: the bundle in a fresh local folder (the caller removes it)."""
    work = tempfile.mkdtemp(prefix="scalecert-bundle-")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(work, filter="data")
    return os.path.join(work, "bundle")


def actor_backend(backend: str, precision: str, bundle, cluster_gpus: float) -> str:
    """The backend the actors run: the certifier's rule (pipelines.pick) with the cluster's GPUs in
    place of this machine's: `auto` is ort-cuda when the cluster has GPUs and the bundle a margin
    measured for it, else ort-cpu (the driver may have no GPU; the actor checks its own)."""
    from scalecert.runtime import pipelines

    return pipelines.pick(backend, precision, bundle, gpus=bool(cluster_gpus))


def pool_shape(backend: str, workers, threads, where: dict) -> tuple[int, float, float]:
    """-> (actors, CPUs per actor, GPUs per actor). CPU actors take `threads` cores each (1 by
    default); GPU actors one GPU each. A pool the cluster cannot hold is refused before any work."""
    gpu = backend in GPU_BACKENDS
    cpus = 1.0 if gpu else float(threads or 1)
    capacity = int(where["cluster_gpus"]) if gpu else int(where["cluster_cpus"] // cpus)
    if workers is None:
        workers = max(1, capacity)
    if workers < 1:
        raise ScaleCertError(f"--workers {workers}: expected a positive number")
    if workers > capacity:
        what = f"{int(where['cluster_gpus'])} GPUs" if gpu else f"{where['cluster_cpus']:g} CPUs"
        raise ScaleCertError(f"--workers {workers}: the Ray cluster has {what}, room for {capacity} "
                             f"{'GPU' if gpu else f'{cpus:g}-core'} actors")
    return workers, cpus, (1.0 if gpu else 0.0)


class _BundleActor:
    """Holds one Certifier over the bundle shipped in the object store."""

    def __init__(self, bundle_ref, options: dict):
        import ray

        from scalecert.runtime import Certifier

        self.bundle_dir = unpack_bundle(ray.get(bundle_ref[0]))
        self.cert = Certifier.load(self.bundle_dir, **options)  # Bundle.open(verify=True): hashes checked here
        self.cert.__enter__()

    def __del__(self):
        try:
            self.cert.close()
        finally:
            shutil.rmtree(os.path.dirname(self.bundle_dir), ignore_errors=True)


class FolderActor(_BundleActor):
    """map_batches UDF: image files (bytes, path) -> results rows (JSON text)."""

    def __init__(self, bundle_ref, options: dict, index_ref):
        import ray

        from scalecert.evaluation.results_file import certifier_sha256

        super().__init__(bundle_ref, options)
        self.index = ray.get(index_ref[0])  # path -> (relative path, true label)
        self.digest = certifier_sha256(self.cert)  # of the bundle as this worker opened it

    def __call__(self, batch: dict) -> dict:
        from scalecert.evaluation.results_file import certify_item

        rows = [json.dumps(certify_item(self.cert, self.digest, str(path), *self.index[str(path)], data=bytes(data)))
                for data, path in zip(batch["bytes"], batch["path"])]
        return {"row": np.array(rows, dtype=object)}


class BenchActor(_BundleActor):
    """map_batches UDF: decoded images (index, pixels) -> pickled Results, timed on the worker."""

    def __init__(self, bundle_ref, options: dict):
        super().__init__(bundle_ref, options)
        _, h, w = self.cert.input_spec["input_size"]
        self.cert.certify(np.zeros((h, w, 3), np.uint8))  # warm-up, as the local run does

    def __call__(self, batch: dict) -> dict:
        out = []
        for pixels in batch["pixels"]:
            result = self.cert.certify(np.asarray(pixels, np.uint8), evaluation=True)
            # the gate is not needed by the report: smaller rows
            result = dataclasses.replace(result, evaluation=dataclasses.replace(result.evaluation, gate=None))
            out.append(pickle.dumps(result))
        return {"index": np.asarray(batch["index"]), "result": np.array(out, dtype=object)}


class Pool:
    """An actor pool planned against the cluster it runs on: where, backend, actors, their resources."""

    folder_actor, bench_actor = FolderActor, BenchActor  # the map_batches UDF classes

    def __init__(self, where: dict, options: dict, workers: int, cpus: float, gpus: float):
        self.where, self.options, self.workers, self.cpus, self.gpus = where, options, workers, cpus, gpus

    @classmethod
    def plan(cls, address: str, bundle, backend: str, options: dict, workers) -> "Pool":
        """Join the cluster and size the pool; everything refused here is refused before any work."""
        where = connect(address)
        options = {**options, "backend": actor_backend(backend, options["precision"], bundle, where["cluster_gpus"])}
        workers, cpus, gpus = pool_shape(options["backend"], workers, options.get("threads"), where)
        if options.get("threads") is None and not gpus:
            options["threads"] = int(cpus)
        where = {**where, "workers": workers, "threads_per_worker": options.get("threads")}
        return cls(where, options, workers, cpus, gpus)

    def for_precision(self, precision: str) -> "Pool":
        return Pool(self.where, {**self.options, "precision": precision}, self.workers, self.cpus, self.gpus)

    def describe(self) -> str:
        return (f"ray: {self.where['nodes']} node(s) at {self.where['address']}, {self.workers} "
                f"{self.options['backend']} actor(s)")

    def _map(self, ds, actor, kwargs: dict):
        from ray.data import ActorPoolStrategy

        return ds.map_batches(actor, batch_size=IMAGES_PER_BATCH, compute=ActorPoolStrategy(size=self.workers),
                              num_cpus=self.cpus, num_gpus=self.gpus or None, fn_constructor_kwargs=kwargs)

    def certify_rows(self, bundle_dir: str, todo, quiet: bool):
        """Rows for `todo` [(path, relative path, label)]; yields them as they arrive."""
        import ray

        if not todo:
            return
        _quiet_progress(quiet)
        index = {path: (rel, label) for path, rel, label in todo}
        # reading is I/O: no CPU reserved for it, or a pool holding every core would starve the reads
        ds = ray.data.read_binary_files([path for path, _, _ in todo], include_paths=True, ignore_missing_paths=True,
                                        num_cpus=0)
        kwargs = {"bundle_ref": [ray.put(pack_bundle(bundle_dir))], "options": self.options,
                  "index_ref": [ray.put(index)]}
        for batch in self._map(ds, self.folder_actor, kwargs).iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                yield json.loads(text)

    def bench_results(self, bundle_dir: str, pixels, quiet: bool) -> tuple[list, dict]:
        """certify() Results of every image in image order, each timed on its worker;
        -> (results, where it ran with the wall time, actor start included)."""
        import ray

        _quiet_progress(quiet)
        kwargs = {"bundle_ref": [ray.put(pack_bundle(bundle_dir))], "options": self.options}
        ds = ray.data.from_items([{"index": i, "pixels": px} for i, px in enumerate(pixels)])
        start = time.perf_counter()
        results = {}
        for out in self._map(ds, self.bench_actor, kwargs).iter_batches(batch_size=None, batch_format="numpy"):
            for i, blob in zip(out["index"], out["result"]):
                results.setdefault(int(i), pickle.loads(blob))  # a retried batch's second copy is dropped
        wall = time.perf_counter() - start
        missing = [i for i in range(len(pixels)) if i not in results]
        if missing:
            raise ScaleCertError(f"ray: no result came back for {len(missing)} of {len(pixels)} images")
        where = {**self.where, "wall_s": round(wall, 3), "wall_images_per_s": round(len(pixels) / wall, 3)}
        return [results[i] for i in range(len(pixels))], where
