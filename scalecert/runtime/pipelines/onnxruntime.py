"""ONNX Runtime pipelines (no torch): CPU, and CUDA (suffix only, IO binding). One session loader for both."""
from __future__ import annotations

import contextlib
import os

import numpy as np

from scalecert.errors import BackendError
from scalecert.runtime.pipelines.base import Pipeline, Runner, window_rows
from scalecert.runtime.pipelines.device import DeviceFeatures, host_windows

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
NO_CUDA = "ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)"


_THREADS: int | None = None  # set by threads_default() (a command's --threads) while the command runs


def default_threads() -> int:
    """Intra-op threads of a CPU session opened without its own count: the enclosing
    threads_default() if any, else every core."""
    return _THREADS or os.cpu_count() or 1


@contextlib.contextmanager
def threads_default(threads: int | None):
    """Every CPU session opened inside without its own thread count uses `threads` (None: no
    change). export and build open sessions in many places; the CLI sets --threads once around them."""
    global _THREADS
    before, _THREADS = _THREADS, threads or _THREADS
    try:
        yield
    finally:
        _THREADS = before


def require_cuda_provider() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(NO_CUDA)


def load_session(path, device: str = "cpu", threads: int | None = None, spin: bool = True, device_id: int = 0,
                 reference: bool = False, weights: dict | None = None):
    """An InferenceSession on the CPU or CUDA execution provider (`path`: a file, or a serialized
    model's bytes; `weights`: {name: array} for initializers the bytes declare as external data,
    scalecert.graph.without_weights), or one line saying why not.

    CPU: `threads` intra-op threads (default every core; windows arrive in batches, so inter-op
    parallelism buys nothing); without `spin` idle workers do not busy-wait on cores another
    session needs. CUDA: cuDNN picks convolution algorithms by heuristic, not by timing, so a
    shape always gets the same kernels; TF32 is off so fp32 means fp32 (reduced precision belongs
    to the fp16/int8 variants, where it is explicit). `reference`: no graph optimisation, so every
    QuantizeLinear/DequantizeLinear runs as the ONNX spec defines it around float kernels; an int8
    variant meant for another engine (TensorRT) is judged by that, not by fused CPU integer kernels
    (x86 without VNNI saturates 16-bit sums of u8 x s8 products when weights use all 8 bits)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if reference else
                                        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3
    if weights:
        options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
    if device == "cuda":
        require_cuda_provider()
        providers = [("CUDAExecutionProvider", {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
                                                "use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
    where = path if isinstance(path, str) else "the serialized model"  # `path` may be a model's bytes
    try:
        session = ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types
        raise BackendError(f"{where}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendError(f"{where}: ONNX Runtime fell back to the CPU (CUDA libraries or GPU unusable); "
                             "check the CUDA/cuDNN versions onnxruntime-gpu needs")
    return session


def fixed_batch(session) -> int | None:
    """The batch every output of the graph fixes (a suffix whose fixed batch of 1 could not be made
    symbolic at export declares (1, classes) logits, manifest tensors.suffix.max_batch), else None."""
    dims = {tuple(o.shape)[0] if o.shape else None for o in session.get_outputs()}
    dim = dims.pop() if len(dims) == 1 else None
    return dim if isinstance(dim, int) and dim > 0 else None


class OrtRunner(Runner):
    """One ONNX file in an ONNX Runtime CPU session."""

    name = "ort"

    def __init__(self, path: str, threads: int | None = None, spin: bool = True, reference: bool = False):
        self.path, self.threads, self.spin, self.reference = path, threads, spin, reference
        self.session = None

    def activate_impl(self) -> None:
        self.session = load_session(self.path, "cpu", self.threads, self.spin, reference=self.reference)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch = fixed_batch(self.session)

    def infer(self, feeds):
        rows = max((len(v) for v in feeds.values() if np.ndim(v)), default=0)
        if self.max_batch is None or rows <= self.max_batch:
            return dict(zip(self.output_names, self.session.run(None, feeds)))
        # a graph that kept its fixed batch (export/batch.py): the rows a call at a time, the rest
        # of the feeds (one image's features for many windows) whole
        runs = [self.session.run(None, {k: v[lo:lo + self.max_batch] if np.ndim(v) and len(v) == rows else v
                                        for k, v in feeds.items()}) for lo in range(0, rows, self.max_batch)]
        return {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(self.output_names)}

    def deactivate_impl(self) -> None:
        self.session = None


WINDOW_PARALLEL_MAX_MACS = 100e6  # suffix MACs per window below which window chunks beat intra-op threads


def window_parallel(precision: str, suffix_macs: float) -> bool:
    """Whether the ORT CPU suffix runs window chunks in parallel (see OrtCpuPipeline): always for
    int8, for fp32/fp16 only when the suffix is small. Export, build and runtime all ask here, so
    the margin is measured the way the runtime will run."""
    return precision == "int8" or suffix_macs < WINDOW_PARALLEL_MAX_MACS


class OrtCpuPipeline(Pipeline):
    """Prefix on all cores (one image batch at a time). Suffix: for a small suffix window-parallel:
    the window batch is split into one chunk per core, each run single-threaded on the same session
    concurrently; small convolutions scale poorly with intra-op threads, whole chunks scale well.
    The same holds for any int8 suffix. A large fp32 suffix runs each batch on all cores. The
    choice is `window_parallel`; the measurements behind it are in benchmarks/RESULTS.md."""

    name = "ort-cpu"
    MIN_CHUNK = 4

    def __init__(self, prefix_path: str, suffix_path: str, threads: int | None = None, window_parallel: bool = True,
                 reference: bool = False):
        self.workers = max(1, threads or default_threads())
        parallel = window_parallel and self.workers > 1
        # Two sessions take turns on the same cores; a spinning prefix pool would steal the suffix's.
        self.prefix_runner = OrtRunner(prefix_path, self.workers, spin=False, reference=reference)
        self.suffix_runner = OrtRunner(suffix_path, 1 if parallel else self.workers, spin=not parallel,
                                       reference=reference)
        self.workers = self.workers if parallel else 1
        self.pool = None

    def activate_impl(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.prefix_runner.activate()
        self.suffix_runner.activate()
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def deactivate_impl(self) -> None:
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
        windows = window_rows(windows).astype(np.int64, copy=False)
        chunks = min(self.workers, len(windows) // self.MIN_CHUNK)
        if self.pool is None or chunks < 2:
            return self._suffix_chunk(features, windows)
        parts = np.array_split(windows, chunks)
        return np.concatenate(list(self.pool.map(lambda part: self._suffix_chunk(features, part), parts)))

    def _suffix_chunk(self, features, windows):
        return self.suffix_runner.infer({"features": features, "windows": windows})["logits"]


class OrtCudaPipeline(Pipeline):
    """The prefix on ONNX Runtime CPU, the suffix on the CUDA execution provider with IO binding
    (docs/design.md §9: GPU convolution algorithms may mix inputs beyond a receptive field, so
    the prefix runs where its locality is proven and probed; the suffix's window then sees
    bitwise the same input on a clean and a patched image). `select(i)` uploads image i's gated
    features to the device once; every window batch of that image binds them by pointer.
    `device="cpu"` runs the binding code on the CPU device (a stand-in where no GPU exists)."""

    name = "ort-cuda"

    def __init__(self, prefix_path: str, suffix_path: str, device: str = "cuda", device_id: int = 0,
                 threads: int | None = None):
        self.suffix_path, self.device, self.device_id = suffix_path, device, device_id
        self.prefix_runner = OrtRunner(prefix_path, threads, spin=False)  # CPU whatever `device` is
        self.suffix_session = self.suffix_binding = None

    def activate_impl(self) -> None:
        self.prefix_runner.activate()
        self.suffix_session = load_session(self.suffix_path, self.device, device_id=self.device_id)
        self.suffix_binding = self.suffix_session.io_binding()
        self.rows = fixed_batch(self.suffix_session) or self.ROWS
        inputs = {i.name: ORT_TYPES.get(i.type) for i in [*self.prefix_runner.session.get_inputs(),
                                                          *self.suffix_session.get_inputs()]}
        self.image_dtype, self.features_dtype, self.windows_dtype = inputs["image"], inputs["features"], inputs["windows"]

    def deactivate_impl(self) -> None:
        self.suffix_binding = self.suffix_session = None
        self.prefix_runner.deactivate()

    def prefix(self, image):
        if not len(image):
            raise BackendError("no images to run")
        out = self.prefix_runner.infer({"image": np.ascontiguousarray(image, self.image_dtype)})
        return out["features"], out["gate"]

    def select(self, features, index):
        """Image `index`'s features as a device OrtValue (bit-for-bit the CPU prefix's output)."""
        import onnxruntime as ort

        host = np.ascontiguousarray(features[index:index + 1], self.features_dtype)
        value = ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)
        return DeviceFeatures(value, [value.data_ptr()], host.shape[1:], host.dtype)

    # Every suffix run has exactly this many rows (the last real row repeated, its logits dropped).
    # ONNX Runtime's CUDA convolution rebuilds its cuDNN plan whenever the input shape differs from
    # the previous run, and window batches alternate sizes (64, then the rest): measured on an H200,
    # ResNet-20's 81 windows took 60 ms per image that way against 1.4 ms per 64-row run at a fixed
    # shape. Padding changes batch sizes only, which the numeric margin (measured through this
    # pipeline) covers.
    ROWS = 64

    def suffix(self, features, windows):
        rows = host_windows(windows, self.windows_dtype)
        if len(rows) == 0:
            return self._run_suffix(features, rows)
        out = []
        for lo in range(0, len(rows), self.rows):
            chunk = rows[lo:lo + self.rows]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.rows - len(chunk), axis=0)])
            out.append(self._run_suffix(features, padded)[:len(chunk)])
        return np.concatenate(out)

    def _run_suffix(self, features, rows: np.ndarray) -> np.ndarray:
        binding = self.suffix_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_input("features", self.device, self.device_id, features.dtype, [1, *features.item_shape], features.ptr)
        binding.bind_cpu_input("windows", np.ascontiguousarray(rows))
        binding.bind_output("logits", "cpu")
        self.suffix_session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], np.float32)
