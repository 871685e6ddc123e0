"""Inference backends as small runners: activate / infer / deactivate, usable as context managers."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ScaleCertError


class Activated:
    """activate() on entering a with-block, deactivate() on leaving it."""

    def activate(self) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()


class Runner(Activated):
    name = "runner"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def ort_providers(device: str = "cpu") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ScaleCertError("ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner(Runner):
    """ONNX Runtime session over one ONNX file. Threads default to every core for one session
    (intra-op parallelism; windows arrive in batches, so inter-op parallelism buys nothing)."""

    name = "ort"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = None, spin: bool = True):
        self.path, self.device, self.threads, self.spin = path, device, threads, spin
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not self.spin:
            # idle workers of this session must not busy-wait on cores the next session needs
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.path, options, providers=ort_providers(self.device))
        except ScaleCertError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ScaleCertError(f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds):
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def deactivate(self) -> None:
        self.session = None


class Pipeline(Activated):
    """One bundle precision on one device: the prefix over image batches, then the suffix over
    window batches of one image. `prefix` returns features in whatever form the backend keeps
    them (numpy here, device buffers on a GPU) plus the gate map as numpy; `select` takes one
    image's features out of a batch; `suffix` returns logits as numpy."""

    name = "pipeline"

    def prefix(self, image: np.ndarray):
        raise NotImplementedError

    def select(self, features, index: int):
        raise NotImplementedError

    def suffix(self, features, windows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


WINDOW_PARALLEL_MAX_MACS = 100e6  # suffix MACs per window below which window chunks beat intra-op threads


def window_parallel(precision: str, suffix_macs: float) -> bool:
    """Whether the ORT CPU suffix runs window chunks in parallel (see OrtCpuPipeline): always for
    int8, for fp32/fp16 only when the suffix is small. Export, build and runtime all ask here, so
    the margin is measured the way the runtime will run."""
    return precision == "int8" or suffix_macs < WINDOW_PARALLEL_MAX_MACS


class OrtCpuPipeline(Pipeline):
    """Prefix on all cores (one image batch at a time). Suffix: for a small suffix (ResNet-20's,
    40 M MACs per window) window-parallel: the window batch is split into one chunk per core, each
    run single-threaded on the same session concurrently; small convolutions scale poorly with
    intra-op threads, whole chunks scale well. The same holds for any int8 suffix (QLinearConv
    hardly scales with intra-op threads on two cores). A large fp32 suffix (EfficientNet-Lite0's,
    335 M) runs each batch on all cores. The choice is `window_parallel`."""

    name = "ort-cpu"
    MIN_CHUNK = 4

    def __init__(self, prefix_path: str, suffix_path: str, threads: int | None = None, window_parallel: bool = True):
        self.workers = max(1, threads or os.cpu_count() or 1)
        parallel = window_parallel and self.workers > 1
        # Two sessions take turns on the same cores; a spinning prefix pool would steal the suffix's.
        self.prefix_runner = OrtRunner(prefix_path, "cpu", self.workers, spin=False)
        self.suffix_runner = OrtRunner(suffix_path, "cpu", 1 if parallel else self.workers, spin=not parallel)
        self.workers = self.workers if parallel else 1
        self.pool = None

    def activate(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.prefix_runner.activate()
        self.suffix_runner.activate()
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def deactivate(self) -> None:
        self.prefix_runner.deactivate()
        self.suffix_runner.deactivate()
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def prefix(self, image):
        out = self.prefix_runner.infer({"image": image})
        return out["features"], out["gate"]

    def select(self, features, index):
        return features[index:index + 1]

    def suffix(self, features, windows):
        windows = windows.astype(np.int64, copy=False)
        chunks = min(self.workers, len(windows) // self.MIN_CHUNK)
        if self.pool is None or chunks < 2:
            return self._suffix_chunk(features, windows)
        parts = np.array_split(windows, chunks)
        return np.concatenate(list(self.pool.map(lambda part: self._suffix_chunk(features, part), parts)))

    def _suffix_chunk(self, features, windows):
        return self.suffix_runner.infer({"features": features, "windows": windows})["logits"]
