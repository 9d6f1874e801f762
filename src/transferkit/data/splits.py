"""Build train/val/test from the user's files and fractions, and check that they make sense together."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from ..config import RunConfig
from ..errors import UserError
from .dataset import Examples, sort_classes
from .packaged import PACKAGED_DATASETS, load_packaged
from .readers import read_examples


@dataclass
class Splits:
    train: Examples
    val: Examples
    test: Examples
    classes: list[str]
    # Domain adaptation: unlabelled target data used in training, and a labelled target test set to report.
    target: Examples | None = None
    target_test: Examples | None = None
    # Distillation: unlabelled transfer examples that only the teacher's soft labels teach.
    transfer: Examples | None = None


def _read(path: str, config: RunConfig) -> Examples:
    return read_examples(path, label_column=config.label_column, text_column=config.text_column,
                         image_column=config.image_column)


def stratified_split(examples: Examples, fraction: float, seed: int, what: str) -> tuple[Examples, Examples]:
    """Split off ``fraction`` of ``examples``, keeping class proportions; returns (rest, split_off)."""
    rest, split_off = stratified_indices(examples, fraction, seed, what)
    return examples.subset(rest), examples.subset(split_off)


def stratified_indices(examples: Examples, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The sorted indices of ``stratified_split``'s two parts, so a caller that needs one part copies only it."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(examples.labels)
    n_classes = len(set(examples.labels))
    n_split = int(round(fraction * len(labels)))
    if n_split < n_classes or len(labels) - n_split < n_classes:
        raise UserError(
            f"{examples.source}: {len(labels)} examples of {n_classes} classes are too few to split off a {what} "
            f"fraction of {fraction}: give a separate {what} file or a larger fraction"
        )
    counts = {label: int((labels == label).sum()) for label in set(examples.labels)}
    rare = sorted(label for label, count in counts.items() if count < 2)
    if rare:
        raise UserError(
            f"{examples.source}: classes {rare[:5]} have a single example, so a stratified {what} split is impossible: "
            f"add examples or give a separate {what} file"
        )
    rest, split_off = train_test_split(np.arange(len(labels)), test_size=n_split, random_state=seed, stratify=labels)
    return np.sort(rest), np.sort(split_off)


def subsample(examples: Examples, limit: int, seed: int) -> Examples:
    """A stratified subset of at most ``limit`` examples (the same one for the same seed)."""
    if len(examples) <= limit:
        return examples
    kept, _ = stratified_indices(examples, 1 - limit / len(examples), seed, "subsample")
    return examples.subset(kept)  # not the rest: ranking 1,000 of 57,000 images need not copy the other 56,000


def _require_two_classes(examples: Examples) -> None:
    classes = set(examples.labels)
    if len(classes) < 2:
        raise UserError(f"{examples.source}: every training example has the label '{classes.pop()}': "
                        f"a classifier needs at least two classes")


def load_splits(config: RunConfig) -> Splits:
    """Read and split the data that ``config`` names, with every consistency check up front."""
    if config.train in PACKAGED_DATASETS:
        packaged = load_packaged(config.train)
        train = packaged["train"]
        test = _read(config.test, config) if config.test else packaged.get("test")
    else:
        train = _read(config.train, config)
        test = _read(config.test, config) if config.test else None
    val = _read(config.val, config) if config.val else None
    _require_two_classes(train)

    if config.test_fraction is not None and test is not None and not config.test:
        raise UserError(f"'{config.train}' ships its own test split: drop 'test_fraction'")
    if test is None:
        train, test = stratified_split(train, config.effective_test_fraction, config.seed, "test")
    if val is None:
        train, val = stratified_split(train, config.effective_val_fraction, config.seed + 1, "validation")
    if config.max_train_examples is not None:
        train = subsample(train, config.max_train_examples, config.seed)

    _require_two_classes(train)
    classes = sort_classes(train.labels)
    for name, split in (("validation", val), ("test", test)):
        if split.modality != train.modality:
            raise UserError(f"{split.source} holds {split.modality}s but the training data holds {train.modality}s: use the same kind of data")
        unseen = sorted(set(split.labels) - set(classes))
        if unseen:
            raise UserError(
                f"{split.source}: {name} labels {unseen[:5]} never occur in the training data {train.source}: "
                f"fix those labels or add training examples of them"
            )
    return Splits(train, val, test, classes)

