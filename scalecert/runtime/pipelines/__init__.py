"""The backend registry: every engine a bundle can run on, and how to open it.

One source for the backend names: the CLI's choices, `scalecert build` and the certifier read
them here. A backend runs a bundle only with a numeric margin measured for it at that precision
(docs/design.md §3.6): its logits could otherwise move with batch composition by an amount
nobody bounded, and a zero delta would then be unsound.
"""
from __future__ import annotations

from scalecert.errors import BackendError, ScaleCertError
from scalecert.runtime.pipelines.base import Pipeline

BACKENDS = ("ort-cpu", "ort-cuda", "trt")
ALIASES = {"ort": "ort-cpu"}
CHOICES = ("auto", "ort", *BACKENDS)  # what a user may type


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} ({', '.join(CHOICES)})")
    return name


def require(backend: str) -> None:
    """One line saying what is missing when this machine cannot run the backend."""
    if backend == "trt":
        from scalecert.runtime.pipelines.tensorrt import require_tensorrt

        require_tensorrt()
    elif backend == "ort-cuda":
        from scalecert.runtime.pipelines.onnxruntime import require_cuda_provider

        require_cuda_provider()


def pick(backend: str, precision: str, bundle, gpus: bool | None = None) -> str:
    """The backend to certify with: `auto` is ort-cuda where it was measured and runs here, else
    ort-cpu; a backend without a measured margin is refused with the command that measures it.
    `gpus`: None picks for this machine (the backend must run here); True/False for machines
    elsewhere with or without GPUs (a Ray driver picking for its actors, which check their own)."""
    if backend == "auto":
        backend = "ort-cpu"
        if bundle.margin("ort-cuda", precision) is not None:
            if gpus is not None:
                backend = "ort-cuda" if gpus else "ort-cpu"
            else:
                try:
                    require("ort-cuda")
                    backend = "ort-cuda"
                except ScaleCertError:
                    pass
    backend = canonical(backend)
    if gpus is None:
        require(backend)
    if bundle.margin(backend, precision) is None:
        raise BackendError(f"this bundle has no numeric margin measured for {backend} at {precision}; run "
                             f"`scalecert build BUNDLE --precision {precision} --backend {backend}` first")
    return backend


def open_pipeline(bundle, backend: str, precision: str, threads: int | None = None) -> Pipeline:
    """An inactive pipeline for one precision of the bundle on one backend; refused for a prefix whose
    locality was not proven and checked (bundle.proven_prefix). Every backend runs the
    prefix on ONNX Runtime CPU (`threads` intra-op threads); the GPU backends run only the suffix
    on the GPU (docs/design.md §9)."""
    backend = canonical(backend)
    bundle.proven_prefix(precision)
    if backend == "trt":
        from scalecert.runtime.pipelines.tensorrt import TrtPipeline

        return TrtPipeline.from_bundle(bundle, precision, threads)
    from scalecert.runtime.pipelines.onnxruntime import OrtCpuPipeline, OrtCudaPipeline, window_parallel

    files = bundle.files(precision)
    if backend == "ort-cuda":
        return OrtCudaPipeline(files["prefix"], files["suffix"], threads=threads)
    return OrtCpuPipeline(files["prefix"], files["suffix"], threads,
                          window_parallel=window_parallel(precision, bundle.suffix_macs))
