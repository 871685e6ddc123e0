"""TensorRT pipeline (no torch): the prefix on ONNX Runtime CPU, the suffix engine on one CUDA stream,
through Polygraphy.

tensorrt and polygraphy are imported lazily: this module loads on any machine.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from scalecert.errors import BackendError
from scalecert.runtime.pipelines.base import Activated, Pipeline
from scalecert.runtime.pipelines.device import DeviceFeatures, batches, host_windows


def require_tensorrt():
    """The tensorrt module, or one line saying what is missing and what to do."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError("the TensorRT backend needs TensorRT (pip install 'scalecert[tensorrt]' from NVIDIA's "
                             "index) and an NVIDIA GPU; use --backend ort here") from None
    return tensorrt



TRT_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}  # trt.DataType names (trt.nptype lacks some in older releases)


def gpu_identity(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor) compute capability) of a CUDA device, through the CUDA runtime
    library that Polygraphy loads (works on Jetsons, which have no nvidia-smi/NVML)."""
    try:
        from polygraphy import cuda

        lib = cuda.wrapper().handle
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"cannot load the CUDA runtime through Polygraphy ({str(exc).splitlines()[0][:120]}); "
                             "TensorRT needs an NVIDIA GPU with CUDA") from None
    major, minor = ctypes.c_int(), ctypes.c_int()
    props = ctypes.create_string_buffer(16384)  # cudaDeviceProp; its first member is char name[256]
    get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    for status in (lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device),  # cudaDevAttrComputeCapabilityMajor
                   lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device),  # cudaDevAttrComputeCapabilityMinor
                   get_props(props, device)):
        if status != 0:
            raise BackendError(f"no usable CUDA device {device} (CUDA runtime error {status})")
    return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"), (major.value, minor.value)


def engine_compatibility(recorded: dict, installed_trt: str, gpu_name: str, compute_capability) -> str | None:
    """None when engines recorded as built for (TensorRT version, GPU name, compute capability)
    run here; otherwise the one-line reason. A TensorRT plan only loads on the TensorRT version
    and GPU model it was built for."""
    built_cc = tuple(recorded.get("compute_capability") or ())
    here_cc = tuple(int(v) for v in compute_capability)
    if (recorded.get("tensorrt"), recorded.get("gpu"), built_cc) == (installed_trt, gpu_name, here_cc):
        return None

    def cc(value):
        return "sm_" + "".join(str(v) for v in value) if value else "sm_?"

    precision = recorded.get("precision", "P")
    return (f"TensorRT engines built for {recorded.get('gpu', '?')} ({cc(built_cc)})/TensorRT "
            f"{recorded.get('tensorrt', '?')}; this machine has {gpu_name} ({cc(here_cc)})/TensorRT {installed_trt}; "
            f"rebuild with `scalecert build BUNDLE --backend trt --precision {precision}`")


def _copy(dst: int, src: int, nbytes: int, kind, stream) -> None:
    from polygraphy import cuda

    if nbytes:
        cuda.wrapper().memcpy(dst, src, nbytes, kind, stream.ptr)


class DeviceBuffers:
    """Named raw device buffers that grow as needed and are reused between calls."""

    def __init__(self):
        self.arrays = {}

    def get(self, name: str, nbytes: int):
        from polygraphy import cuda

        array = self.arrays.get(name)
        if array is None:
            array = self.arrays[name] = cuda.DeviceArray.raw((max(1, nbytes),))
        elif nbytes > array.allocated_nbytes:
            array.resize((nbytes,))
        return array

    def free(self) -> None:
        for array in self.arrays.values():
            array.free()
        self.arrays = {}


class TrtEngine(Activated):
    """One deserialized engine and its execution context. `run` sets input shapes and tensor
    addresses and enqueues on the given stream (TensorRT 10/11 name-based API)."""

    def __init__(self, plan_path: str):
        self.plan_path = plan_path
        self.engine = self.context = None

    def activate_impl(self) -> None:
        from polygraphy.backend.trt import EngineFromBytes

        try:
            with open(self.plan_path, "rb") as f:
                self.engine = EngineFromBytes(f.read())()
            self.context = self.engine.create_execution_context()
        except OSError as exc:
            raise BackendError(f"{self.plan_path}: cannot read the engine ({exc.strerror})") from None
        except Exception as exc:  # noqa: BLE001 - Polygraphy raises its own exception type
            raise BackendError(f"{self.plan_path}: TensorRT cannot load this engine ({str(exc).splitlines()[0][:160]}); "
                                 "rebuild it with `scalecert build BUNDLE --backend trt`") from None
        if self.context is None:
            raise BackendError(f"{self.plan_path}: TensorRT could not create an execution context (GPU memory?)")
        self.dtypes = {}
        for name in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)):
            kind = self.engine.get_tensor_dtype(name).name
            if kind not in TRT_TYPES:
                raise BackendError(f"{self.plan_path}: engine tensor {name} is {kind}, which scalecert does not exchange")
            self.dtypes[name] = np.dtype(TRT_TYPES[kind])

    def deactivate_impl(self) -> None:
        self.context = None  # the context goes before its engine
        self.engine = None

    def item_shape(self, name: str) -> tuple:
        """Shape of one batch item of a tensor (the engine's dims after the dynamic batch axis)."""
        return tuple(self.engine.get_tensor_shape(name))[1:]

    def run(self, inputs: dict, outputs: dict, stream) -> None:
        """inputs: name -> (device pointer, shape); outputs: name -> device pointer."""
        for name, (ptr, shape) in inputs.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise BackendError(f"{self.plan_path}: input {name} shape {tuple(shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, ptr)
        for name, ptr in outputs.items():
            self.context.set_tensor_address(name, ptr)
        if not self.context.execute_async_v3(stream.ptr):
            raise BackendError(f"{self.plan_path}: TensorRT execution failed")


class TrtPipeline(Pipeline):
    """The prefix on ONNX Runtime CPU, the suffix as a TensorRT engine on one CUDA stream
    (docs/design.md §9: TensorRT may choose Winograd or FFT tactics whose outputs depend on
    inputs beyond a receptive field, so the prefix runs where its locality is proven and probed).
    `select(i)` copies image i's gated features into one aligned device buffer (valid until the
    next `select`); windows go up as int32 rectangles. Window batches larger than the engine's
    optimisation profile are split into profile-sized runs over the same buffers."""

    name = "trt"

    def __init__(self, prefix_onnx: str, suffix_plan: str, max_windows: int, threads: int | None = None,
                 max_rectangles: int = 1):
        from scalecert.runtime.pipelines.onnxruntime import OrtRunner

        self.prefix_runner = OrtRunner(prefix_onnx, threads, spin=False)
        self.suffix_engine = TrtEngine(suffix_plan)
        self.max_windows = int(max_windows)
        self.max_rectangles = int(max_rectangles)  # rectangles per suffix row the engine's profile admits
        self.stream = None

    @classmethod
    def from_bundle(cls, bundle, precision: str, threads: int | None = None) -> "TrtPipeline":
        entry = bundle.engines(precision)
        where = bundle.path
        if not entry:
            raise BackendError(f"{where}: no TensorRT engines for {precision}; build them on the target machine "
                                 f"with `scalecert build {where} --backend trt --precision {precision}`")
        trt = require_tensorrt()
        gpu_name, capability = gpu_identity()
        reason = engine_compatibility(entry, trt.__version__, gpu_name, capability)
        if reason:
            raise BackendError(f"{where}: {reason.replace('BUNDLE', where)}")
        try:
            max_windows, max_coords = entry["profiles"]["suffix"]["windows"]["max"][:2]
        except (KeyError, IndexError, TypeError, ValueError):
            raise BackendError(f"{where}: the trt-{precision} engine record has no optimisation profiles; "
                                 f"rebuild with `scalecert build {where} --backend trt --precision {precision}`") from None
        return cls(bundle.files(precision)["prefix"], os.path.join(where, entry["suffix"]), max_windows, threads,
                   int(max_coords) // 4)

    def activate_impl(self) -> None:
        from polygraphy import cuda

        require_tensorrt()
        self.prefix_runner.activate()
        self.suffix_engine.activate()
        if self.suffix_engine.dtypes["windows"] != np.int32:
            raise BackendError(f"{self.suffix_engine.plan_path}: windows input is not int32; rebuild the engines")
        self.stream = cuda.Stream()
        self.buffers = DeviceBuffers()

    def deactivate_impl(self) -> None:
        """Also after a failed activate: whatever came up (a session, an engine, the stream) goes down."""
        if self.stream is not None:
            self.stream.synchronize()
            self.buffers.free()
            self.stream.free()
            self.stream = None
        self.prefix_runner.deactivate()
        self.suffix_engine.deactivate()

    def prefix(self, image):
        if not len(image):
            raise BackendError("no images to run")
        out = self.prefix_runner.infer({"image": np.ascontiguousarray(image, np.float32)})
        return out["features"], out["gate"]

    def select(self, features, index):
        """Image `index`'s features in the suffix engine's type, copied to an aligned device buffer."""
        from polygraphy import cuda

        host = np.ascontiguousarray(features[index:index + 1], self.suffix_engine.dtypes["features"])
        buffer = self.buffers.get("features", host.nbytes)
        _copy(buffer.ptr, host.ctypes.data, host.nbytes, cuda.MemcpyKind.HostToDevice, self.stream)
        self.stream.synchronize()  # `host` is a temporary
        return DeviceFeatures(buffer, [buffer.ptr], host.shape[1:], host.dtype)

    def suffix(self, features, windows):
        """Window batches larger than the engine profile's maximum run in profile-sized pieces,
        each copied to the start of the device buffers (so every address stays aligned)."""
        from polygraphy import cuda

        engine = self.suffix_engine
        windows = host_windows(windows, np.int32)
        if windows.shape[1] > 4 * self.max_rectangles:
            raise BackendError(f"{engine.plan_path}: the engine takes at most {self.max_rectangles} rectangle(s) per "
                                 "row (built before recovery); rebuild with `scalecert build BUNDLE --backend trt`")
        logits = np.empty((len(windows), *engine.item_shape("logits")), engine.dtypes["logits"])
        piece = min(len(windows), self.max_windows)
        windows_dev = self.buffers.get("windows", windows[:piece].nbytes)
        logits_dev = self.buffers.get("logits", logits[:piece].nbytes)
        for lo, hi in batches(len(windows), self.max_windows):
            _copy(windows_dev.ptr, windows[lo:hi].ctypes.data, windows[lo:hi].nbytes, cuda.MemcpyKind.HostToDevice, self.stream)
            engine.run({"features": (features.ptr, (1, *features.item_shape)), "windows": (windows_dev.ptr, (hi - lo, windows.shape[1]))},
                       {"logits": logits_dev.ptr}, self.stream)
            _copy(logits[lo:hi].ctypes.data, logits_dev.ptr, logits[lo:hi].nbytes, cuda.MemcpyKind.DeviceToHost, self.stream)
        self.stream.synchronize()
        return logits.astype(np.float32, copy=False)
