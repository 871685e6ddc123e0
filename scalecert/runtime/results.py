"""What certification returns (no torch): frozen, typed, and the same fields `certify --json` prints.

`Result` (detection) carries a `Status`, the label, timings, the alert windows as tuples and a
`SourceReport` (the certificate in camera pixels, docs/design.md §8). The per-window prediction map
that evaluation needs rides only when asked for (`certify(..., evaluation=True)`), as `WindowMap`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields

import numpy as np

Window = tuple[int, int, int, int]  # feature-space [y0, x0, y1, x1)


class Status(str, enum.Enum):
    """A detection verdict (core/decision.py). A str, so it compares and serialises as its value."""

    CERTIFIED = "certified"  # no patch of the threat model could have forced this label
    ALERT = "alert"  # some window disagrees: a patch may be there (alert_windows localise it)
    UNCERTIFIED = "uncertified"  # neither: a margin too thin, or a confidence below the threshold

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class SourceReport:
    """The certificate in source pixels for one image size (runtime/source.py::report)."""

    size: tuple[int, int]  # the decoded source's (height, width), EXIF orientation applied
    covered_patch: tuple[int, int] | None  # a source patch this size is covered anywhere; None: none is bounded
    window: tuple[int, int, int, int] | None = None  # the source pixels that reach the input [y0, x0, y1, x1)
    requested_patch: tuple[int, int] | None = None
    needed_input_patch: tuple[int, int] | None = None
    note: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> "SourceReport":
        def pair(key):
            return tuple(int(v) for v in data[key]) if data.get(key) is not None else None

        return cls(pair("size"), pair("covered_patch"), pair("window"), pair("requested_patch"),
                   pair("needed_input_patch"), data.get("note"))

    def to_json(self) -> dict:
        out = {"size": list(self.size), "covered_patch": None if self.covered_patch is None else list(self.covered_patch)}
        for key in ("window", "requested_patch", "needed_input_patch"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class WindowMap:
    """Per window of the family: predicted label (-1: not evaluated, early exit), margin and
    log-confidence; the base's log-confidence; the gate. Evaluation re-decides from these."""

    labels: np.ndarray
    margins: np.ndarray
    logconf: np.ndarray
    base_logconf: float
    gate: np.ndarray | None


@dataclass(frozen=True)
class Result:
    image: str
    status: Status
    label: int
    class_name: str | None
    windows_total: int
    windows_evaluated: int
    latency_ms: float
    prefix_ms: float
    suffix_ms: float
    kept_fraction: float
    base_margin: float  # top-1 minus top-2 logit, net of the rounding floor (core/decision.py)
    confidence: float = 1.0  # softmax probability of the label on the un-occluded features
    threshold: float = 0.0  # the confidence threshold T of the decision
    alert_windows: tuple[Window, ...] = ()
    source: SourceReport | None = None
    evaluation: WindowMap | None = None  # only with certify(..., evaluation=True)

    @property
    def certified(self) -> bool:
        return self.status is Status.CERTIFIED

    def _evaluation(self) -> WindowMap:
        if self.evaluation is None:
            raise AttributeError("the window map rides only with certify(..., evaluation=True)")
        return self.evaluation

    # the evaluation map's arrays, by the names reports and probes use
    window_labels = property(lambda self: self._evaluation().labels)
    window_margins = property(lambda self: self._evaluation().margins)
    window_logconf = property(lambda self: self._evaluation().logconf)
    base_logconf = property(lambda self: self._evaluation().base_logconf)
    gate = property(lambda self: self._evaluation().gate)

    def to_json(self) -> dict:
        """The `certify --json` object."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("evaluation", "class_name")}
        out["status"] = self.status.value
        out["class"] = self.class_name
        for key in ("latency_ms", "prefix_ms", "suffix_ms"):
            out[key] = round(out[key], 3)
        out["base_margin"] = float(self.base_margin)
        out["confidence"] = round(self.confidence, 6)
        if self.status is Status.ALERT:
            out["alert_windows"] = [list(w) for w in self.alert_windows]
        else:
            out.pop("alert_windows")
        if self.source is None:
            out.pop("source")
        else:
            out["source"] = self.source.to_json()
        return out
