"""GPU pipelines (no torch): ONNX Runtime with the CUDA execution provider, and TensorRT engines.

Both keep the prefix's gated features on the device: the prefix leaves each image's features at
an aligned device address, `select(i)` picks image i's (no copy), and the suffix reads them there
for every window batch of that image. Windows go up from the host (four integers each); the gate
map and the logits come back. A pipeline's features stay valid until its next `prefix` call,
which is how the certifier uses them.

onnxruntime, tensorrt and polygraphy are imported lazily: this module loads on any machine.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

from ..errors import ScaleCertError
from .backends import Pipeline

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def require_tensorrt():
    """The tensorrt module, or one line saying what is missing and what to do."""
    try:
        import tensorrt
    except ImportError:
        raise ScaleCertError("the TensorRT backend needs TensorRT (pip install 'scalecert[tensorrt]' from NVIDIA's "
                             "index) and an NVIDIA GPU; use --backend ort here") from None
    return tensorrt


# --- shared by both pipelines ------------------------------------------------------------

ALIGN = 256  # bytes; every device tensor address handed to an engine is a multiple of this


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


def batches(n: int, limit: int | None) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering n items, each at most `limit` long (one range without a limit)."""
    step = max(1, int(limit)) if limit else max(1, n)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


class DeviceFeatures:
    """Gated features of a batch of images in device memory: one aligned address per image
    (`owner` keeps the memory alive). The prefix runs one image at a time on the GPU pipelines,
    so an image's features (and with them its gates) never depend on which other images shared
    its batch, and the suffix always reads them from an aligned address."""

    def __init__(self, owner, ptrs, item_shape, dtype):
        self.owner, self.ptrs = owner, [int(p) for p in ptrs]
        self.item_shape, self.dtype = tuple(int(d) for d in item_shape), np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.ptrs)

    @property
    def shape(self) -> tuple:
        return (len(self.ptrs), *self.item_shape)

    @property
    def ptr(self) -> int:
        if len(self.ptrs) != 1:
            raise ScaleCertError(f"the suffix takes one image's features, got {len(self.ptrs)}; select one first")
        return self.ptrs[0]

    def image(self, index: int) -> "DeviceFeatures":
        return DeviceFeatures(self.owner, [self.ptrs[index]], self.item_shape, self.dtype)


def host_windows(windows: np.ndarray, dtype) -> np.ndarray:
    """Window rectangles as a contiguous host array of the engine's integer type."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ScaleCertError(f"windows must be (B, 4) rectangles, got shape {windows.shape}")
    if np.dtype(dtype) == np.int32 and len(windows) and np.abs(windows).max() > np.iinfo(np.int32).max:
        raise ScaleCertError("window coordinates do not fit int32")
    return np.ascontiguousarray(windows, dtype)


# --- ONNX Runtime, CUDA execution provider -----------------------------------------------


def ort_cuda_session(path: str, device: str = "cuda", device_id: int = 0):
    """An InferenceSession on the CUDA execution provider (or on the CPU one, device="cpu", which
    runs the same IO-binding code where no GPU exists). cuDNN picks convolution algorithms by
    heuristic, not by timing, so a shape always gets the same kernels; TF32 is off so fp32 means
    fp32 (reduced precision belongs to the fp16/int8 variants, where it is explicit)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ScaleCertError("ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu on a GPU machine)")
        providers = [("CUDAExecutionProvider", {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC",
                                                "use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise ScaleCertError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise ScaleCertError(f"{path}: ONNX Runtime fell back to the CPU (CUDA libraries or GPU unusable); "
                             "check the CUDA/cuDNN versions onnxruntime-gpu needs")
    return session


class OrtCudaPipeline(Pipeline):
    """Prefix and suffix sessions on the CUDA execution provider with IO binding: each image's
    `features` output stays on the device as an OrtValue, which the suffix binds by pointer."""

    name = "ort-cuda"

    def __init__(self, prefix_path: str, suffix_path: str, device: str = "cuda", device_id: int = 0):
        self.prefix_path, self.suffix_path = prefix_path, suffix_path
        self.device, self.device_id = device, device_id
        self.prefix_session = self.suffix_session = None

    def activate(self) -> None:
        self.prefix_session = ort_cuda_session(self.prefix_path, self.device, self.device_id)
        self.suffix_session = ort_cuda_session(self.suffix_path, self.device, self.device_id)
        self.prefix_binding = self.prefix_session.io_binding()
        self.suffix_binding = self.suffix_session.io_binding()
        inputs = {i.name: ORT_TYPES.get(i.type) for i in [*self.prefix_session.get_inputs(), *self.suffix_session.get_inputs()]}
        self.image_dtype, self.windows_dtype = inputs["image"], inputs["windows"]

    def deactivate(self) -> None:
        self.prefix_binding = self.suffix_binding = None
        self.prefix_session = self.suffix_session = None

    def prefix(self, image):
        binding, values, gates = self.prefix_binding, [], []
        image = np.ascontiguousarray(image, self.image_dtype)
        for i in range(len(image)):  # one image per run: see DeviceFeatures
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            binding.bind_cpu_input("image", image[i:i + 1])
            binding.bind_output("features", self.device, self.device_id)
            binding.bind_output("gate", "cpu")
            self.prefix_session.run_with_iobinding(binding)
            features, gate = binding.get_outputs()
            values.append(features)
            gates.append(gate.numpy())
        if not values:
            raise ScaleCertError("no images to run")
        item = values[0].shape()[1:]
        return DeviceFeatures(values, [v.data_ptr() for v in values], item, ORT_TYPES[values[0].data_type()]), np.concatenate(gates)

    def select(self, features, index):
        return features.image(index)

    def suffix(self, features, windows):
        binding = self.suffix_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_input("features", self.device, self.device_id, features.dtype, [1, *features.item_shape], features.ptr)
        binding.bind_cpu_input("windows", host_windows(windows, self.windows_dtype))
        binding.bind_output("logits", "cpu")
        self.suffix_session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], np.float32)


# --- TensorRT ----------------------------------------------------------------------------

TRT_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}  # trt.DataType names (trt.nptype lacks some in older releases)


def gpu_identity(device: int = 0) -> tuple[str, tuple[int, int]]:
    """(name, (major, minor) compute capability) of a CUDA device, through the CUDA runtime
    library that Polygraphy loads (works on Jetsons, which have no nvidia-smi/NVML)."""
    try:
        from polygraphy import cuda

        lib = cuda.wrapper().handle
    except Exception as exc:  # noqa: BLE001
        raise ScaleCertError(f"cannot load the CUDA runtime through Polygraphy ({str(exc).splitlines()[0][:120]}); "
                             "TensorRT needs an NVIDIA GPU with CUDA") from None
    major, minor = ctypes.c_int(), ctypes.c_int()
    props = ctypes.create_string_buffer(16384)  # cudaDeviceProp; its first member is char name[256]
    get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    for status in (lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device),  # cudaDevAttrComputeCapabilityMajor
                   lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device),  # cudaDevAttrComputeCapabilityMinor
                   get_props(props, device)):
        if status != 0:
            raise ScaleCertError(f"no usable CUDA device {device} (CUDA runtime error {status})")
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


class TrtEngine:
    """One deserialized engine and its execution context. `run` sets input shapes and tensor
    addresses and enqueues on the given stream (TensorRT 10/11 name-based API)."""

    def __init__(self, plan_path: str):
        self.plan_path = plan_path
        self.engine = self.context = None

    def activate(self) -> None:
        from polygraphy.backend.trt import EngineFromBytes

        try:
            with open(self.plan_path, "rb") as f:
                self.engine = EngineFromBytes(f.read())()
            self.context = self.engine.create_execution_context()
        except OSError as exc:
            raise ScaleCertError(f"{self.plan_path}: cannot read the engine ({exc.strerror})") from None
        except Exception as exc:  # noqa: BLE001 - Polygraphy raises its own exception type
            raise ScaleCertError(f"{self.plan_path}: TensorRT cannot load this engine ({str(exc).splitlines()[0][:160]}); "
                                 "rebuild it with `scalecert build BUNDLE --backend trt`") from None
        if self.context is None:
            raise ScaleCertError(f"{self.plan_path}: TensorRT could not create an execution context (GPU memory?)")
        self.dtypes = {}
        for name in (self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)):
            kind = self.engine.get_tensor_dtype(name).name
            if kind not in TRT_TYPES:
                raise ScaleCertError(f"{self.plan_path}: engine tensor {name} is {kind}, which scalecert does not exchange")
            self.dtypes[name] = np.dtype(TRT_TYPES[kind])

    def deactivate(self) -> None:
        self.context = None  # the context goes before its engine
        self.engine = None

    def item_shape(self, name: str) -> tuple:
        """Shape of one batch item of a tensor (the engine's dims after the dynamic batch axis)."""
        return tuple(self.engine.get_tensor_shape(name))[1:]

    def run(self, inputs: dict, outputs: dict, stream) -> None:
        """inputs: name -> (device pointer, shape); outputs: name -> device pointer."""
        for name, (ptr, shape) in inputs.items():
            if not self.context.set_input_shape(name, tuple(shape)):
                raise ScaleCertError(f"{self.plan_path}: input {name} shape {tuple(shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, ptr)
        for name, ptr in outputs.items():
            self.context.set_tensor_address(name, ptr)
        if not self.context.execute_async_v3(stream.ptr):
            raise ScaleCertError(f"{self.plan_path}: TensorRT execution failed")


class TrtPipeline(Pipeline):
    """Prefix and suffix TensorRT engines on one CUDA stream. Features stay in a device buffer
    between the engines; windows go up as int32 rectangles. Batches larger than an engine's
    optimisation profile are split into profile-sized runs over offsets of the same buffers."""

    name = "trt"

    def __init__(self, prefix_plan: str, suffix_plan: str, max_images: int, max_windows: int):
        self.prefix_engine, self.suffix_engine = TrtEngine(prefix_plan), TrtEngine(suffix_plan)
        self.max_images, self.max_windows = int(max_images), int(max_windows)
        self.stream = None

    @classmethod
    def from_bundle(cls, bundle_dir: str, manifest: dict, precision: str) -> "TrtPipeline":
        entry = (manifest.get("engines") or {}).get(f"trt-{precision}")
        if not entry:
            raise ScaleCertError(f"{bundle_dir}: no TensorRT engines for {precision}; build them on the target machine "
                                 f"with `scalecert build {bundle_dir} --backend trt --precision {precision}`")
        trt = require_tensorrt()
        gpu_name, capability = gpu_identity()
        reason = engine_compatibility(entry, trt.__version__, gpu_name, capability)
        if reason:
            raise ScaleCertError(f"{bundle_dir}: {reason.replace('BUNDLE', bundle_dir)}")
        try:
            max_images = entry["profiles"]["prefix"]["image"]["max"][0]
            max_windows = entry["profiles"]["suffix"]["windows"]["max"][0]
        except (KeyError, IndexError, TypeError):
            raise ScaleCertError(f"{bundle_dir}: the trt-{precision} engine record has no optimisation profiles; "
                                 f"rebuild with `scalecert build {bundle_dir} --backend trt --precision {precision}`") from None
        return cls(os.path.join(bundle_dir, entry["prefix"]), os.path.join(bundle_dir, entry["suffix"]),
                   max_images, max_windows)

    def activate(self) -> None:
        from polygraphy import cuda

        require_tensorrt()
        self.prefix_engine.activate()
        self.suffix_engine.activate()
        if self.prefix_engine.dtypes["features"] != self.suffix_engine.dtypes["features"]:
            raise ScaleCertError(f"{self.prefix_engine.plan_path}: prefix features are {self.prefix_engine.dtypes['features']} "
                                 f"but the suffix takes {self.suffix_engine.dtypes['features']}; rebuild the engines")
        if self.suffix_engine.dtypes["windows"] != np.int32:
            raise ScaleCertError(f"{self.suffix_engine.plan_path}: windows input is not int32; rebuild the engines")
        self.stream = cuda.Stream()
        self.buffers = DeviceBuffers()

    def deactivate(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
            self.buffers.free()
            self.stream.free()
            self.stream = None
        self.prefix_engine.deactivate()
        self.suffix_engine.deactivate()

    def prefix(self, image):
        """One image per engine run (see DeviceFeatures), each image's features at its own aligned
        offset of one device buffer; gates come back to the host."""
        from polygraphy import cuda

        engine = self.prefix_engine
        image = np.ascontiguousarray(image, engine.dtypes["image"])
        if not len(image):
            raise ScaleCertError("no images to run")
        item = engine.item_shape("features")
        stride = aligned(int(np.prod(item)) * engine.dtypes["features"].itemsize)
        gate = np.empty((len(image), *engine.item_shape("gate")), engine.dtypes["gate"])
        image_dev = self.buffers.get("image", image[0].nbytes)
        gate_dev = self.buffers.get("gate", gate[0].nbytes)
        features_dev = self.buffers.get("features", len(image) * stride)
        for i in range(len(image)):
            _copy(image_dev.ptr, image[i].ctypes.data, image[i].nbytes, cuda.MemcpyKind.HostToDevice, self.stream)
            engine.run({"image": (image_dev.ptr, (1, *image.shape[1:]))},
                       {"features": features_dev.ptr + i * stride, "gate": gate_dev.ptr}, self.stream)
            _copy(gate[i].ctypes.data, gate_dev.ptr, gate[i].nbytes, cuda.MemcpyKind.DeviceToHost, self.stream)
        self.stream.synchronize()
        return DeviceFeatures(features_dev, [features_dev.ptr + i * stride for i in range(len(image))], item,
                              engine.dtypes["features"]), gate

    def select(self, features, index):
        return features.image(index)

    def suffix(self, features, windows):
        """Window batches larger than the engine profile's maximum run in profile-sized pieces,
        each copied to the start of the device buffers (so every address stays aligned)."""
        from polygraphy import cuda

        engine = self.suffix_engine
        windows = host_windows(windows, np.int32)
        logits = np.empty((len(windows), *engine.item_shape("logits")), engine.dtypes["logits"])
        piece = min(len(windows), self.max_windows)
        windows_dev = self.buffers.get("windows", windows[:piece].nbytes)
        logits_dev = self.buffers.get("logits", logits[:piece].nbytes)
        for lo, hi in batches(len(windows), self.max_windows):
            _copy(windows_dev.ptr, windows[lo:hi].ctypes.data, windows[lo:hi].nbytes, cuda.MemcpyKind.HostToDevice, self.stream)
            engine.run({"features": (features.ptr, (1, *features.item_shape)), "windows": (windows_dev.ptr, (hi - lo, 4))},
                       {"logits": logits_dev.ptr}, self.stream)
            _copy(logits[lo:hi].ctypes.data, logits_dev.ptr, logits[lo:hi].nbytes, cuda.MemcpyKind.DeviceToHost, self.stream)
        self.stream.synchronize()
        return logits.astype(np.float32, copy=False)
