"""scalecert: certified patch-attack detection (ScaleCert) compiled to ONNX / TensorRT bundles.

The embeddable API (docs/api.md), torch-free:

    import scalecert
    cert = scalecert.load("model.scalecert")          # detection, or the bundle's default mode
    result = cert.certify(rgb_uint8_frame)            # -> scalecert.Result (frozen)
    if result.status is scalecert.Status.ALERT: ...

Errors are `scalecert.ScaleCertError` and its kinds (`BundleError`, `ImageError`, `BackendError`,
`OptionError`, ...; scalecert/errors.py). Heavy modules load on first use, not on import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from scalecert.errors import (BackendError, BundleError, DataError, ImageError, ModelError, OptionError,
                              ScaleCertError)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from scalecert.runtime.certifier import Certifier
    from scalecert.runtime.recovery import Recoverer, RecoveryResult
    from scalecert.runtime.results import Result, SourceReport, Status, WindowMap

_LAZY = {"Certifier": "scalecert.runtime.certifier", "Result": "scalecert.runtime.results",
         "Status": "scalecert.runtime.results", "SourceReport": "scalecert.runtime.results",
         "WindowMap": "scalecert.runtime.results", "Recoverer": "scalecert.runtime.recovery",
         "RecoveryResult": "scalecert.runtime.recovery"}

__all__ = ["load", "Certifier", "Recoverer", "Result", "RecoveryResult", "Status", "SourceReport", "WindowMap",
           "ScaleCertError", "OptionError", "BundleError", "ImageError", "DataError", "BackendError", "ModelError",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalecert' has no attribute {name!r}")


def load(bundle: str, *, mode: str | None = None, backend: str = "auto", precision: str = "fp32",
         threads: int | None = None, batch: int = 64, threshold: float | None = None, early_exit: bool = False,
         certify_recovery: bool = False) -> "Certifier | Recoverer":
    """Open a bundle for certification: a `Certifier` (mode "detect") or a `Recoverer` ("recover");
    `mode=None` takes the bundle's default. Both are context managers (`with scalecert.load(...) as c:`)
    and release their sessions on `close()`. `threshold` and `early_exit` belong to detection,
    `certify_recovery` to recovery. Not thread-safe: one per thread, or a lock (docs/api.md)."""
    from scalecert.bundle import Bundle
    from scalecert.bundle.manifest import check_mode
    from scalecert.runtime.certifier import Certifier

    mode = check_mode(mode) if mode is not None else Bundle.open(bundle, verify=False).default_mode
    if mode == "detect":
        if certify_recovery:
            raise OptionError("certify_recovery belongs to mode 'recover'")
        return Certifier.load(bundle, backend, precision, batch=batch, early_exit=early_exit, threads=threads,
                              threshold=threshold)
    if threshold is not None or early_exit:
        raise OptionError("threshold and early_exit belong to mode 'detect'; recovery has no alert")
    from scalecert.runtime.recovery import Recoverer

    return Recoverer.load(bundle, backend=backend, batch=batch, threads=threads, precision=precision,
                          certify=certify_recovery)
