"""Multi-task fine-tuning: hard or soft parameter sharing, task sampling, loss weighting."""

from .config import MultiTaskConfig
from .model import MultiTaskModel, load_multitask, save_multitask
from .run import fit_multitask
from .weighting import WEIGHTINGS, LossWeighting, create_weighting

__all__ = ["MultiTaskConfig", "MultiTaskModel", "WEIGHTINGS", "LossWeighting", "create_weighting", "fit_multitask",
           "load_multitask", "save_multitask"]
