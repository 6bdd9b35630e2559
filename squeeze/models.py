"""Backbone registry: the ConvNet-D family, CIFAR-style ResNets, and any timm or torchvision model by name.

Each entry carries what callers need without building the model: whether it has BatchNorm (the precondition of BN
inversion), its native input size and its default mean/std (``None`` where the data decides). Names:

* ``convnet`` / ``convnet_bn`` / ``convnet_in`` (depth from the image size unless ``depth=`` is given),
  ``convnet3``, ``convnet4``, ``convnet5`` (instance norm, as the matching literature uses) and ``convnet3_bn`` ...
* ``lenet_sigmoid``: the sigmoid LeNet of the gradient-leakage papers (DLG, iDLG).
* ``resnet18_cifar``, ``resnet50_cifar``: timm ResNets with a 3x3 stride-1 stem and no max-pool, for 32 px images.
* ``timm:NAME``: any timm architecture (e.g. ``timm:resnet18``, ``timm:test_resnet``).
* ``tv:NAME``: any torchvision classification architecture (e.g. ``tv:resnet18``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from distillset.core.errors import DistillError, unknown_name
from distillset.core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelEntry:
    """Registry metadata of one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    has_bn: bool
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    description: str = ""
    defaults: dict = field(default_factory=dict)


# the ConvNet family and the small cross-architecture nets are defined in this module, so no built-in module to import
BACKBONES = Registry("backbone", "distillset.backbones")


def register_model(name: str, *, has_bn: bool, input_size: int | None = None, mean=None, std=None, paper: str = "",
                   **defaults):
    """Decorator registering ``builder(num_classes, in_chans, img_size, **kwargs) -> nn.Module`` under ``name``.

    The backbone registry entry carries ``has_bn``, ``input_size``, ``mean``/``std`` and the builder's default keyword
    arguments as metadata.
    """
    return BACKBONES.register(name, paper=paper, has_bn=has_bn, input_size=input_size, mean=mean, std=std,
                              defaults=dict(defaults))


def list_models() -> list[str]:
    return BACKBONES.names() + ["timm:<name>", "tv:<name>"]


def model_entry(name: str) -> ModelEntry:
    """Metadata for ``name``; timm/torchvision names get their BN flag by building the model once on the meta device."""
    if not name.startswith(("timm:", "tv:")):
        e = BACKBONES.entry(name) if name in BACKBONES else None
        if e is None:
            raise unknown_name("model", name, list_models())
        m = e.metadata
        has_bn = m.get("has_bn")
        if has_bn is None:  # a plugin builder registered through its entry point alone: look at the layers
            with torch.device("meta"):
                has_bn = has_batchnorm(e.obj(num_classes=10, in_chans=3, img_size=32))
        return ModelEntry(name, e.obj, has_bn, m.get("input_size"), m.get("mean"), m.get("std"), e.description,
                          dict(m.get("defaults") or {}))
    if name.startswith(("timm:", "tv:")):
        with torch.device("meta"):
            model = _external(name, num_classes=10, in_chans=3, img_size=224)
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
        if name.startswith("timm:"):
            import timm.data

            cfg = timm.data.resolve_model_data_config(model)
            mean, std, size = tuple(cfg["mean"]), tuple(cfg["std"]), cfg["input_size"][-1]
        return ModelEntry(name, lambda **kw: _external(name, **kw), has_batchnorm(model), size, mean, std)
    raise unknown_name("model", name, list_models())


def create_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 32, **kwargs) -> nn.Module:
    """Build an architecture by registry name (randomly initialised)."""
    entry = model_entry(name)
    kw = {**entry.defaults, **kwargs}
    return entry.builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kw)


def has_batchnorm(model: nn.Module) -> bool:
    """True if any module is a BatchNorm layer (checked by type, not by name)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------------------------------------- ConvNet


def default_depth(img_size: int) -> int:
    """ConvNet depth that leaves a feature map of at least 2x2 (or 1x1 for tiny inputs): 32 px -> 3, 64 -> 4."""
    return int(min(5, max(2, round(math.log2(max(img_size, 4))) - 2)))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "instancenorm":  # GroupNorm with one group per channel = instance norm with affine, as in DC/DM/MTT
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise DistillError(f"unknown ConvNet norm '{kind}'; use batchnorm, instancenorm or none.")


class ConvNet(nn.Module):
    """D x [conv3x3 -> norm -> ReLU -> avg-pool 2] -> linear: the standard dataset-distillation ConvNet."""

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 128,
                 depth: int | None = None, norm: str = "instancenorm"):
        super().__init__()
        depth = depth or default_depth(img_size)
        layers: list[nn.Module] = []
        c, size = in_chans, img_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True)]
            if size >= 2:
                layers.append(nn.AvgPool2d(2))
                size //= 2
            c = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@register_model("convnet", has_bn=False, norm="instancenorm")
@register_model("convnet_in", has_bn=False, norm="instancenorm")
def _convnet(num_classes, in_chans, img_size, **kw):
    """ConvNet-D with instance norm (depth from the image size)."""
    return ConvNet(num_classes, in_chans, img_size, **kw)


@register_model("convnet_bn", has_bn=True, norm="batchnorm")
def _convnet_bn(num_classes, in_chans, img_size, **kw):
    """ConvNet-D with BatchNorm (depth from the image size)."""
    return ConvNet(num_classes, in_chans, img_size, **kw)


def _fixed_depth(depth: int, norm: str, has_bn: bool):
    suffix = "_bn" if norm == "batchnorm" else ""

    def _build(num_classes, in_chans, img_size, **kw):
        return ConvNet(num_classes, in_chans, img_size, **kw)

    _build.__doc__ = f"ConvNet-{depth} with {norm}."
    register_model(f"convnet{depth}{suffix}", has_bn=has_bn, norm=norm, depth=depth)(_build)


for _d in (2, 3, 4, 5):
    _fixed_depth(_d, "instancenorm", False)
    _fixed_depth(_d, "batchnorm", True)


# ---------------------------------------------------------------------- cross-architecture nets of the matching papers

VGG11_PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for small images (the cross-architecture student of DC/DSA/DM/MTT): 3x3 convs with a norm, five 2x2
    max-pools, then one linear layer on what is left of the feature map."""

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 32, norm: str = "instancenorm",
                 width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_chans, img_size
        for k, item in enumerate(VGG11_PLAN):
            if item == "M":
                # an instance norm over a 1x1 map outputs zeros: pool a map below 2x2 only after the last conv
                if size >= 4 or (k == len(VGG11_PLAN) - 1 and size >= 2):
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = int(item) * width // 64
            pad = 3 if (not layers and img_size == 28) else 1  # 28 px (MNIST) grows to 32, as the papers' VGG
            layers += [nn.Conv2d(c, out, 3, padding=pad), _norm(norm, out), nn.ReLU(inplace=True)]
            size += 2 * (pad - 1)
            c = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class AlexNetSmall(nn.Module):
    """AlexNet-style net for small images (the other cross-architecture student of the matching papers): five convs
    (5x5, 5x5, then three 3x3) with ReLU, three 2x2 max-pools, no norm, one linear layer."""

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 128):
        super().__init__()
        w1, w2, w3 = width, width * 3 // 2, width * 2
        pad = 4 if img_size == 28 else 2  # 28 px (MNIST) grows to 32 in the first conv, so both end at 4x4
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w1, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w3, w2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        size = (img_size + 2 * pad - 4) // 8
        self.classifier = nn.Linear(w2 * size * size, num_classes)
        for m in self.features:  # no norm layer: He init keeps the ReLU stack's signal alive from the first step
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("vgg11", has_bn=False, norm="instancenorm")
def _vgg11(num_classes, in_chans, img_size, **kw):
    """VGG-11 for small images with instance norm (matching-papers cross-architecture student)."""
    return VGG11(num_classes, in_chans, img_size, **kw)


@register_model("vgg11_bn", has_bn=True, norm="batchnorm")
def _vgg11_bn(num_classes, in_chans, img_size, **kw):
    """VGG-11 for small images with BatchNorm."""
    return VGG11(num_classes, in_chans, img_size, **kw)


@register_model("alexnet", has_bn=False)
def _alexnet(num_classes, in_chans, img_size, **kw):
    """AlexNet-style net for small images (matching-papers cross-architecture student)."""
    return AlexNetSmall(num_classes, in_chans, img_size, **kw)


class LeNetSigmoid(nn.Module):
    """The LeNet of the gradient-leakage papers (DLG, iDLG): three 5x5 convolutions of ``width`` channels with strides
    2, 2, 1 and padding 2, each followed by a sigmoid, no pooling, then one linear layer (588 features for 28 px,
    768 for 32 px at width 12).

    Sigmoids keep the network twice differentiable everywhere, which gradient matching needs (a ReLU net's
    gradient-of-gradient is piecewise constant). Every weight and bias is drawn uniformly from
    ``[-init_range, init_range]`` (0.5 in both papers: large weights make the gradient informative about the
    input); ``init_range`` 0 keeps PyTorch's default initialisation.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, img_size: int = 32, width: int = 12,
                 init_range: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_chans, img_size
        for stride in (2, 2, 1):
            layers += [nn.Conv2d(c, width, 5, stride=stride, padding=2), nn.Sigmoid()]
            c, size = width, (size - 1) // stride + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)
        if init_range:
            for p in self.parameters():
                nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_model("lenet_sigmoid", has_bn=False, paper="Zhu et al. 2019, Deep Leakage from Gradients (NeurIPS)")
def _lenet_sigmoid(num_classes, in_chans, img_size, **kw):
    """DLG's sigmoid LeNet (3 strided 5x5 convs, no pooling; weights uniform in [-0.5, 0.5])."""
    return LeNetSigmoid(num_classes, in_chans, img_size, **kw)


# ------------------------------------------------------------------------------------------------------ CIFAR ResNets


def _cifar_resnet(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    import timm

    model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, pretrained=False)
    # 32 px images: a 3x3 stride-1 stem and no max-pool keep the spatial size for the residual stages.
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model("resnet18_cifar", has_bn=True, input_size=32)
def _resnet18_cifar(num_classes, in_chans, img_size, **kw):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (CIFAR style)."""
    return _cifar_resnet("resnet18", num_classes, in_chans)


@register_model("resnet50_cifar", has_bn=True, input_size=32)
def _resnet50_cifar(num_classes, in_chans, img_size, **kw):
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool (CIFAR style)."""
    return _cifar_resnet("resnet50", num_classes, in_chans)


# ------------------------------------------------------------------------------------------------ timm / torchvision


def _external(name: str, num_classes: int, in_chans: int = 3, img_size: int = 224, **kw) -> nn.Module:
    prefix, _, arch = name.partition(":")
    if prefix == "timm":
        import timm

        if not timm.is_model(arch):
            raise unknown_name("timm model", arch, timm.list_models()[:0] or ["(see timm.list_models())"])
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, pretrained=False, **kw)
    import torchvision.models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise unknown_name("torchvision model", arch, tvm.list_models(module=tvm))
    if in_chans != 3:
        raise DistillError(f"torchvision model '{arch}' takes 3-channel input but the data has {in_chans}; "
                           "use a registry ConvNet/ResNet or a timm model (they accept any channel count).")
    return tvm.get_model(arch, weights=None, num_classes=num_classes, **kw)
