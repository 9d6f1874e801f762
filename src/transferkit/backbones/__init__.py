"""Backbones: pretrained feature extractors that carry their own preprocessing."""

from .base import Backbone
from .registry import create_backbone, packaged_models, rebuild_backbone

__all__ = ["Backbone", "create_backbone", "packaged_models", "rebuild_backbone"]
