"""Small look-alikes of torchvision's classifier families, in the four files a user brings.

torchvision cannot be imported in CI (it would pull in another torch build), so each family is
rewritten here with torchvision's module structure and forward code, at a few channels and a
64x64 input: what matters for export is the graph (the ops and how the exporters write them),
not the width. Weights are random (seeded), BatchNorm statistics too, and the classifier is
scaled so that top-1 has a clear margin on real photos.

    ResNetLike        torchvision.models.resnet: 7x7 stem, max-pool, BasicBlocks with a
                      downsample, adaptive average pool, `x.view(x.size(0), -1)`, fc
    MobileNetV3Like   InvertedResidual with squeeze-excitation (ReLU, hardsigmoid), hardswish,
                      classifier Linear-Hardswish-Dropout-Linear
    EfficientNetLike  MBConv (SiLU, squeeze-excitation with sigmoid, stochastic depth), head conv
    RegNetYLike       ResBottleneckBlock: 1x1, grouped 3x3 (group width 8), squeeze-excitation, 1x1
    ConvNeXtLike      patchify stem, LayerNorm2d (channels-last LayerNorm through permutes),
                      CNBlock: 7x7 depthwise, permute, LayerNorm, Linear-GELU-Linear, layer scale
    ViTLike           conv patch embedding, class token, position embedding, EncoderBlocks with
                      nn.MultiheadAttention (batch_first), `x[:, 0]`, head

`save_formats` writes one model as TorchScript (`torch.jit.trace` under `torch.no_grad()`, as most
deployment recipes do), torch.export (`torch.export.export` with one example image, then
`torch.export.save`: a fixed batch of 1), plain `torch.onnx.export(model, (x,), path)` (torch
2.13's default, dynamo, exporter: the batch of x, 1, fixed) and ONNX with a dynamic batch
(`dynamic_shapes`): the four FORMATS. "onnx-legacy" is the plain call of torch before 2.9 (the
TorchScript-based exporter, `dynamo=False`, opset 17, a fixed batch of 1).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT = (3, 64, 64)
CLASSES = 10
FORMATS = ("pt", "pt2", "onnx-fixed", "onnx-dynamic")
FILE_NAMES = {"pt": "model.pt", "pt2": "model.pt2", "onnx-fixed": "fixed.onnx", "onnx-dynamic": "dynamic.onnx",
              "onnx-legacy": "legacy.onnx"}


def _bn(c):
    return nn.BatchNorm2d(c)


# --- ResNet -------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _bn(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet-50): 1x1, 3x3 (the stride), 1x1 to 4x the width."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), _bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), _bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), _bn(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetLike(nn.Module):
    """Stages of `blocks` blocks each, the first at `width` channels and stride 1, each next one twice
    as wide at stride 2 (ResNet-50: Bottleneck, width 64, blocks (3, 4, 6, 3))."""

    def __init__(self, width=8, num_classes=CLASSES, block=BasicBlock, blocks=(1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, expansion = width, getattr(block, "expansion", 1)
        for stage, count in enumerate(blocks):
            planes = width * 2 ** stage
            layers = []
            for i in range(count):
                layers.append(block(inplanes, planes, 2 if stage and not i else 1))
                inplanes = planes * expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)  # the classic head; torchvision now writes torch.flatten(x, 1)
        return self.fc(x)


# --- MobileNetV3 --------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), _bn(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, expanded, cout, k, stride, se, act):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expanded != cin:
            layers.append(_conv_bn_act(cin, expanded, 1, act=act))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, max(8, expanded // 4), nn.ReLU, nn.Hardsigmoid))
        layers.append(_conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Like(nn.Module):
    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_act(3, 8, 3, 2, act=nn.Hardswish),
            InvertedResidual(8, 8, 8, 3, 2, True, nn.ReLU),
            InvertedResidual(8, 24, 8, 3, 1, False, nn.ReLU),
            InvertedResidual(8, 32, 16, 5, 2, True, nn.Hardswish),
            _conv_bn_act(16, 48, 1, act=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --- EfficientNet -------------------------------------------------------------------------------------


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth ("row" mode): the identity in eval mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin, expand, cout, k, stride, sd_prob):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = cin * expand
        layers = []
        if expanded != cin:
            layers.append(_conv_bn_act(cin, expanded, 1, act=nn.SiLU))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, groups=expanded, act=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), nn.SiLU, nn.Sigmoid))
        layers.append(_conv_bn_act(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLike(nn.Module):
    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_act(3, 8, 3, 2, act=nn.SiLU),
            MBConv(8, 1, 8, 3, 1, 0.0),
            MBConv(8, 4, 12, 3, 2, 0.05),
            MBConv(12, 4, 12, 5, 1, 0.1),
            _conv_bn_act(12, 48, 1, act=nn.SiLU),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(48, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --- RegNet-Y -----------------------------------------------------------------------------------------


class ResBottleneckBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=8, se_ratio=0.25):
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = _conv_bn_act(cin, cout, 1, stride, act=None)
        groups = cout // group_width
        self.f = nn.Sequential(
            _conv_bn_act(cin, cout, 1),
            _conv_bn_act(cout, cout, 3, stride, groups=groups),
            SqueezeExcitation(cout, max(1, int(round(se_ratio * cin))), nn.ReLU, nn.Sigmoid),
            _conv_bn_act(cout, cout, 1, act=None),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNetYLike(nn.Module):
    def __init__(self, num_classes=CLASSES):
        super().__init__()
        self.stem = _conv_bn_act(3, 8, 3, 2)
        self.trunk_output = nn.Sequential(ResBottleneckBlock(8, 16, 2), ResBottleneckBlock(16, 16, 1),
                                          ResBottleneckBlock(16, 32, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


# --- ConvNeXt -----------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: LayerNorm over channels, through permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6 * 1e5, sd_prob=0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXtLike(nn.Module):
    """A 4x4 stride-4 stem with LayerNorm2d, then stages of CNBlocks of `dims` channels, `depths`
    blocks each, joined by LayerNorm2d and a 2x2 stride-2 conv (ConvNeXt-T: (96, 192, 384, 768), (3, 3, 9, 3))."""

    def __init__(self, num_classes=CLASSES, dims=(8, 16), depths=(1, 1)):
        super().__init__()
        stages = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i:
                stages.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)))
            stages.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# --- ViT ----------------------------------------------------------------------------------------------


class MLPBlock(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, heads, dim, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class ViTLike(nn.Module):
    def __init__(self, image=64, patch=8, dim=32, heads=4, depth=2, num_classes=CLASSES, mlp_dim=None):
        super().__init__()
        self.patch_size, self.hidden_dim = patch, dim
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        seq = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*[EncoderBlock(heads, dim, mlp_dim or 2 * dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.heads = nn.Sequential(nn.Linear(dim, num_classes))

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(self.dropout(x + self.pos_embedding)))
        return self.heads(x[:, 0])


FAMILIES = {
    "resnet": ResNetLike,
    "mobilenet_v3": MobileNetV3Like,
    "efficientnet": EfficientNetLike,
    "regnet_y": RegNetYLike,
    "convnext": ConvNeXtLike,
    "vit": ViTLike,
}

# torchvision's sizes, at 3x224x224 and 1000 classes (benchmarks/export_times.py --full-size)
FULL_SIZE = {
    "resnet50": lambda: ResNetLike(64, 1000, Bottleneck, (3, 4, 6, 3)),
    "convnext_tiny": lambda: ConvNeXtLike(1000, (96, 192, 384, 768), (3, 3, 9, 3)),
    "vit_b_16": lambda: ViTLike(224, 16, 768, 12, 12, 1000, mlp_dim=3072),
}
FULL_SIZE_INPUT = (3, 224, 224)


def build(family: str, seed: int = 0) -> nn.Module:
    """The look-alike in eval mode: seeded random weights, random BatchNorm statistics and affine
    terms (as after training), the class token random, the last Linear scaled so that logits
    differ by more than rounding (top-1 comparisons then mean something)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (FAMILIES.get(family) or FULL_SIZE[family])()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
            if isinstance(model, ViTLike):
                model.class_token.normal_(std=0.5)
            last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.mul_(8.0)
    return model.eval()


def save_formats(model: nn.Module, folder: str, formats=FORMATS, input_chw=INPUT) -> dict[str, str]:
    """Write `model` in each of `formats` into `folder`; returns {format: path}."""
    os.makedirs(folder, exist_ok=True)
    example = torch.rand(1, *input_chw, generator=torch.Generator().manual_seed(1))
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in formats:
            path = paths[fmt] = os.path.join(folder, FILE_NAMES[fmt])
            if fmt == "pt":
                with torch.no_grad():
                    torch.jit.trace(model, example).save(path)
            elif fmt == "pt2":
                torch.export.save(torch.export.export(model, (example,)), path)
            elif fmt == "onnx-fixed":  # what `torch.onnx.export(model, x, path)` writes: the batch of x, fixed
                torch.onnx.export(model, (example,), path, verbose=False)
            elif fmt == "onnx-legacy":  # the same before torch 2.9 made dynamo the default (opset 17)
                torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17)
            elif fmt == "onnx-dynamic":
                # an example batch of 2: torch.export specialises a dimension whose example size is 1
                torch.onnx.export(model, (example.expand(2, -1, -1, -1),), path, dynamo=True, input_names=["input"],
                                  output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                  verbose=False)
            else:
                raise ValueError(fmt)
    return paths
