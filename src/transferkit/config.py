"""Run configuration: one dataclass, validated on construction, round-tripped through YAML.

``transferkit fit --config RUN/config.yaml`` replays a run because the run directory holds the
resolved ``RunConfig`` that produced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MONITORS = ("val_accuracy", "val_macro_f1", "val_loss")
# Which epoch an adaptation run keeps: the lowest DEV estimate of the target risk, or the best source accuracy.
ADAPT_SELECTIONS = ("dev", "source-val")
SCHEDULES = ("linear", "cosine", "exponential", "one-cycle", "constant")
OPTIMIZERS = ("adamw", "sgd")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "oversample")
IMAGE_AUGMENTATIONS = ("flip", "crop", "affine")
PRECISIONS = ("fp32", "bf16")
POOLINGS = ("mean", "cls")
DIVERGENCE_ACTIONS = ("stop", "skip")
HEAD_INITS = ("random", "probe")


@dataclass
class RunConfig:
    """Everything that defines one fine-tuning run.

    Data: ``train`` is a table (CSV/TSV/JSONL/Parquet), an image folder, an IDX images file or the
    name of a packaged dataset (``fashion-mnist``). ``val``/``test`` are files of the same kind; when
    absent they are split off ``train`` with the seeded stratified fractions.
    """

    train: str = ""
    val: str | None = None
    test: str | None = None
    text_column: str | None = None
    label_column: str = "label"
    image_column: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    max_train_examples: int | None = None

    model: str = ""
    image_size: int | None = None
    max_length: int | None = None
    keep_layers: int | None = None
    pooling: str = "mean"
    allow_pickle: bool = False

    strategy: str = "full"
    head_init: str = "random"
    freeze_layers: int | None = None
    lr_decay: float | None = None
    unfreeze_every: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    adapter_targets: str | None = None

    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None
    head_lr: float | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    l2_sp: float | None = None
    l1: float | None = None
    label_smoothing: float = 0.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.99)
    ema_warmup: bool = True  # warm the average's decay up over the first steps (timm's ModelEma); False: no warm-up
    target: str | None = None
    target_test: str | None = None
    adapt_method: str = "source-only"
    adapt_weight: float = 1.0
    adapt_lr: float | None = None  # the domain discriminator's (DANN, CDAN) learning rate; default head_lr or lr
    adapt_selection: str = "dev"
    teacher: str | None = None
    distill_data: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    class_weights: str = "none"
    logit_adjustment: float | None = None  # tau of the logit-adjusted loss (1.0 usual); None: plain cross-entropy
    sampler: str = "shuffle"
    mixup: float | None = None
    noise: float | None = None
    token_mask: float | None = None
    image_augment: str | None = None
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    grad_clip: float | None = 1.0
    accumulate: int = 1
    dropout: float = 0.1
    freeze_batchnorm: bool = False  # BatchNorm layers keep their pretrained statistics (eval mode) while training
    patience: int | None = 2
    monitor: str = "val_accuracy"
    precision: str = "fp32"
    compile: bool = False
    cache_frozen: bool = True  # freeze-bottom: compute the frozen layers once and replay them every epoch
    seed: int = 0
    checkpoint_every: int | None = None
    on_divergence: str = "stop"

    baseline: bool = True
    baseline_epochs: int = 20
    baseline_lr: float = 1e-3

    out: str = "runs/latest"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject impossible or contradictory settings with a message naming the field."""
        if not self.train:
            raise UserError("config field 'train' is empty: pass --train FILE (a table, an image folder or 'fashion-mnist')")
        if not self.model:
            raise UserError("config field 'model' is empty: pass --model NAME (run 'transferkit models' for the packaged ones)")
        for name, value, options in (
            ("monitor", self.monitor, MONITORS),
            ("adapt_selection", self.adapt_selection, ADAPT_SELECTIONS),
            ("schedule", self.schedule, SCHEDULES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("class_weights", self.class_weights, CLASS_WEIGHTS),
            ("sampler", self.sampler, SAMPLERS),
            ("precision", self.precision, PRECISIONS),
            ("pooling", self.pooling, POOLINGS),
            ("on_divergence", self.on_divergence, DIVERGENCE_ACTIONS),
            ("head_init", self.head_init, HEAD_INITS),
        ):
            if value not in options:
                raise UserError(f"config field '{name}' is '{value}': choose one of {', '.join(options)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "baseline_epochs", "accumulate"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"config field '{name}' is {getattr(self, name)}: it must be a positive integer")
        for name in ("lr", "head_lr", "baseline_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"config field '{name}' is {value}: it must be a positive number")
        if self.logit_adjustment is not None:
            if not self.logit_adjustment > 0:
                raise UserError(f"config field 'logit_adjustment' is {self.logit_adjustment}: it must be a positive "
                                f"number (1.0 is usual), or absent for plain cross-entropy")
            # Each of these corrects for the class frequencies already; two together over-correct.
            for name, value, plain in (("class_weights", self.class_weights, "none"), ("sampler", self.sampler, "shuffle")):
                if value != plain:
                    raise UserError(f"'logit_adjustment' and {name} '{value}' both correct for class imbalance: "
                                    f"keep one (set {name} to '{plain}' or remove logit_adjustment)")
            if self.target:
                raise UserError("'logit_adjustment' does not apply to domain adaptation (--target): remove one of them")
        if self.weight_decay < 0:
            raise UserError(f"config field 'weight_decay' is {self.weight_decay}: it must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"config field 'warmup_ratio' is {self.warmup_ratio}: it must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise UserError(f"config field 'dropout' is {self.dropout}: it must be in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"config field 'grad_clip' is {self.grad_clip}: it must be positive or absent")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"config field 'patience' is {self.patience}: it must be >= 1, or absent to disable early stopping")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"config field 'checkpoint_every' is {self.checkpoint_every}: it must be a positive number of steps")
        if self.max_train_examples is not None and self.max_train_examples < 2:
            raise UserError(f"config field 'max_train_examples' is {self.max_train_examples}: it must be >= 2")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise UserError(f"config field 'image_size' is {self.image_size}: choose a size between 8 and 1024 pixels")
        if self.keep_layers is not None and self.keep_layers < 1:
            raise UserError(f"config field 'keep_layers' is {self.keep_layers}: keep at least 1 layer")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"config field 'max_length' is {self.max_length}: it must be >= 2 tokens")
        for name, given_file in (("val_fraction", self.val), ("test_fraction", self.test)):
            fraction = getattr(self, name)
            if fraction is not None and not 0 < fraction < 1:
                raise UserError(f"config field '{name}' is {fraction}: it must be between 0 and 1")
            if fraction is not None and given_file:
                split = name.split("_")[0]
                raise UserError(
                    f"both '{split}' (a file) and '{name}' are set: give a {split} file or a fraction of train, not both"
                )
        if self.text_column and self.image_column:
            raise UserError("both 'text_column' and 'image_column' are set: a run reads either texts or images")
        if self.freeze_layers is not None:
            if self.strategy not in ("freeze-bottom", "discriminative-lr"):
                raise UserError(
                    f"'freeze_layers' is set but strategy is '{self.strategy}': it applies to --strategy freeze-bottom "
                    f"or discriminative-lr only"
                )
            if self.freeze_layers < 0:
                raise UserError(f"config field 'freeze_layers' is {self.freeze_layers}: it must be >= 0")
        if self.lr_decay is not None:
            if self.strategy != "discriminative-lr":
                raise UserError(f"'lr_decay' is set but strategy is '{self.strategy}': it applies to --strategy discriminative-lr only")
            if not 0 < self.lr_decay <= 1:
                raise UserError(f"config field 'lr_decay' is {self.lr_decay}: it must be in (0, 1]")
        if self.unfreeze_every is not None:
            if self.strategy != "gradual-unfreeze":
                raise UserError(f"'unfreeze_every' is set but strategy is '{self.strategy}': it applies to --strategy gradual-unfreeze only")
            if self.unfreeze_every < 1:
                raise UserError(f"config field 'unfreeze_every' is {self.unfreeze_every}: it must be >= 1 epoch")
        for name in ("lora_rank", "lora_alpha", "lora_dropout"):
            if getattr(self, name) is not None and self.strategy != "lora":
                raise UserError(f"'{name}' is set but strategy is '{self.strategy}': it applies to --strategy lora only")
        if self.adapter_targets is not None and self.strategy not in ("lora", "ia3"):
            raise UserError(f"'adapter_targets' is set but strategy is '{self.strategy}': it applies to lora or ia3 only")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise UserError(f"config field 'lora_rank' is {self.lora_rank}: the rank must be >= 1 (8 or 16 are usual)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"config field 'lora_alpha' is {self.lora_alpha}: it must be positive (often 2 x rank)")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise UserError(f"config field 'lora_dropout' is {self.lora_dropout}: it must be in [0, 1)")
        for name in ("l2_sp", "l1"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"config field '{name}' is {value}: it must be a positive strength, or absent")
        if self.head_init == "probe" and self.strategy == "linear-probe":
            raise UserError("'head_init' is 'probe' but the strategy is linear-probe, which is the probe itself: "
                            "use --head-init probe with a strategy that trains the backbone (full, lora, ...)")
        if self.l2_sp is not None and self.strategy == "linear-probe":
            raise UserError("'l2_sp' pulls the backbone towards its pretrained weights, but linear-probe freezes the backbone: drop one")
        if self.target_test and not self.target:
            raise UserError("'target_test' is set without 'target': give the unlabelled target data with --target")
        if self.adapt_method != "source-only" and not self.target:
            raise UserError(f"'adapt_method' is '{self.adapt_method}' but no 'target' is given: pass --target FILE "
                            f"(unlabelled target-domain data)")
        if self.target and self.mixup:
            raise UserError("'target' and 'mixup' together are not supported: drop --mixup for domain adaptation")
        if self.target and self.teacher:
            raise UserError("'target' and 'teacher' together are not supported: adapt first, then distil the adapted run")
        if self.target and self.adapt_method != "source-only" and self.strategy == "linear-probe":
            raise UserError("linear-probe freezes the backbone, so its features cannot adapt to the target: "
                            "use full, lora, bitfit or freeze-bottom")
        if self.adapt_lr is not None and not self.adapt_lr > 0:
            raise UserError(f"config field 'adapt_lr' is {self.adapt_lr}: it must be positive (e.g. 1e-3)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"config field 'ema_decay' is {self.ema_decay}: it must lie between 0 and 1 (e.g. 0.99 "
                            f"averages over about the last 100 steps), or be absent")
        if not self.adapt_weight > 0:
            raise UserError(f"config field 'adapt_weight' is {self.adapt_weight}: it must be positive (1.0 is usual)")
        if not 0 <= self.distill_alpha <= 1:
            raise UserError(f"config field 'distill_alpha' is {self.distill_alpha}: it is the weight of the hard-label "
                            f"loss, in [0, 1] (0.5 is usual)")
        if not self.distill_temperature > 0:
            raise UserError(f"config field 'distill_temperature' is {self.distill_temperature}: it must be positive (1-4 is usual)")
        if self.distill_data and not self.teacher:
            raise UserError("'distill_data' (unlabelled transfer examples) needs a 'teacher' to label them: pass --teacher RUN")
        if self.distill_data and self.strategy == "linear-probe":
            raise UserError("'distill_data' with linear-probe is not supported: use full, lora, bitfit or freeze-bottom")
        if self.distill_data and self.sampler == "oversample":
            raise UserError("'distill_data' with --sampler oversample is not supported: the transfer examples have no class")
        if self.teacher and self.mixup:
            raise UserError("'teacher' and 'mixup' together are not supported: the teacher's predictions are computed once "
                            "for the unmixed examples; drop --mixup")
        if self.mixup is not None and not self.mixup > 0:
            raise UserError(f"config field 'mixup' is {self.mixup}: it is the Beta alpha, a positive number (0.2-0.4 is usual)")
        if self.noise is not None and not self.noise > 0:
            raise UserError(f"config field 'noise' is {self.noise}: it is a standard deviation, a positive number")
        if self.token_mask is not None and not 0 < self.token_mask < 1:
            raise UserError(f"config field 'token_mask' is {self.token_mask}: it is a fraction of tokens in (0, 1)")
        if self.image_augment is not None:
            unknown = [a for a in self.augmentations if a not in IMAGE_AUGMENTATIONS]
            if unknown:
                raise UserError(f"config field 'image_augment' names {unknown}: choose from {', '.join(IMAGE_AUGMENTATIONS)} (comma-separated)")
        if self.strategy == "linear-probe" and (self.image_augment or self.token_mask or self.noise):
            raise UserError("linear-probe trains on features computed once, so input augmentation cannot apply: "
                            "drop image_augment/token_mask/noise, or use mixup, or another strategy")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"config field 'label_smoothing' is {self.label_smoothing}: it must be in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise UserError(f"config field 'momentum' is {self.momentum}: it must be in [0, 1)")

    @property
    def augmentations(self) -> list[str]:
        return [a.strip() for a in (self.image_augment or "").split(",") if a.strip()]

    @property
    def effective_val_fraction(self) -> float:
        return 0.1 if self.val_fraction is None else self.val_fraction

    @property
    def effective_test_fraction(self) -> float:
        return 0.1 if self.test_fraction is None else self.test_fraction

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}"
            )
        typed = {}
        for f in fields(cls):
            if f.name in values:
                typed[f.name] = _coerce(f, values[f.name], source)
        return cls(**typed)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml(path), source=str(path))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} is not valid YAML ({type(error).__name__}): fix its syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    return values


def parse_key_values(text: str, flag: str, example: str) -> dict[str, Any]:
    """``name=a,train=a.tsv,text_column=sentence`` -> a mapping (the CLI's --task and --client)."""
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} '{text}': write key=value pairs separated by commas, e.g. {example}")
        values[key.strip().replace("-", "_")] = value.strip()
    return values


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Convert YAML/CLI values to the field's type, with an error that names the field."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in str(f.type)):
        return None
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: field '{f.name}' is {value!r}, which is not a valid {kind.split(' ')[0]}") from None
