"""What `scalecert-export` is asked for: the options, and the request checked from them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExportOptions:
    model: str | None
    output: str | None = None
    arch: str | None = None
    input_size: tuple | None = None
    patch: str | None = None  # None: the tune record's, else "2%"
    for_source: str | None = None  # "WxH": --patch is in pixels of a source (camera) of this size
    layer: str | None = None  # None: the tune record's, else "auto"
    prune_rate: str | None = None  # None: the tune record's, else "auto"
    stride: str | None = None  # None: the tune record's, else "auto"
    window_budget: int | None = None  # None: plan.WINDOW_BUDGET of the mode
    max_growth: float = 2.0
    calib: str | None = None
    calib_limit: int = 128
    budget: float = 37.0  # full-model forwards per image: the pixel baseline's clean + 36 masked
    threshold: float = 0.0
    mode: str | None = None  # the bundle's default certify mode (bundle/manifest.py MODES); None: the tune
    # record's target (a checkpoint tuned --for recover exports for recovery), else detect
    fill: str | None = None  # what windows hold: "blank" or "zero"; None/"auto": zero for a tuned checkpoint, else blank
    channel_prune: float = 0.0
    remove_dead_channels: bool = True
    phi: str = "abs"
    classes: str | None = None
    mean: tuple | None = None  # None: the arch's, else ImageNet's (assumed, and export says so)
    std: tuple | None = None
    resize: str | None = None  # short side in pixels, or "none" (straight to the input size); None: assumed
    trust_pickle: bool = False
    pretrained: bool = False
    force: bool = False
    log: list = field(default_factory=list)
    echo: object = None  # called with each line as it happens (the CLI's click.echo), besides `log`

    def say(self, message: str) -> None:
        self.log.append(message)
        if self.echo is not None:
            self.echo(message)


@dataclass
class Request:
    """What the options ask for, checked before any long work."""

    output: str
    input_spec: dict
    image_hw: tuple[int, int]
    patch_hw: tuple[int, int]
    calibration_items: list | None
    record: dict | None  # the tune record's SIN gate, when it applies
    source: dict | None = None  # --for-source: the camera size and source patch the input patch was sized for
