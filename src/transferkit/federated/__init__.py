"""Federated fine-tuning on Flower: clients fine-tune locally, a Flower strategy aggregates."""

from .config import FederatedConfig
from .run import federate

__all__ = ["FederatedConfig", "federate"]
