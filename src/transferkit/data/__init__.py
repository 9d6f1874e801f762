"""Data: readers for the user's files, packaged datasets, and train/val/test splits."""

from .dataset import Examples, ImageArray, ImagePaths, encode_labels, sort_classes
from .readers import read_examples
from .splits import Splits, load_splits

__all__ = ["Examples", "ImageArray", "ImagePaths", "Splits", "encode_labels", "load_splits", "read_examples", "sort_classes"]
