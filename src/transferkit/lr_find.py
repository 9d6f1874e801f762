"""``transferkit lr-find``: the LR range test on the user's model, data and strategy, with a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data.dataset import encode_labels
from .data.in_memory import accepts_tables
from .engine.batches import Batches, feature_collate
from .engine.feature_cache import compute_features
from .engine.loop import default_device
from .engine.lr_finder import plot_range_test, range_test
from .finetune import HeadOnFeatures, _objective, build, resolve_config
from .strategies.base import decay_groups


@accepts_tables("lr_find()")
def lr_find(config: RunConfig | str | Path | None = None, *, steps: int = 100, **fields: Any) -> dict[str, Any]:
    """Run the range test and write ``lr_find.png`` and ``lr_find.json`` into ``config.out``."""
    config = resolve_config(config, fields)
    config, splits, strategy, model = build(config)
    backbone = model.backbone
    labels = encode_labels(splits.train.labels, splits.classes)
    prepared = backbone.prepare(splits.train.inputs)
    device = default_device()
    objective = _objective(config, model, labels)
    if strategy.uses_feature_cache:
        features = compute_features(backbone, prepared, config.eval_batch_size, "features (train)", device)
        target = HeadOnFeatures(model.head)
        batches = Batches(features, labels, feature_collate, config.batch_size, shuffle=True, seed=config.seed)
        groups = decay_groups(list(target.parameters()), 1.0, config.weight_decay)
        result = range_test(target, groups, objective, batches, steps=steps, device=device)
    else:
        batches = Batches(prepared, labels, backbone.collate, config.batch_size, shuffle=True, seed=config.seed,
                          lengths=backbone.lengths(prepared))
        groups = strategy.param_groups(model, 1.0, None, config.weight_decay)
        result = range_test(model, groups, objective, batches, steps=steps, device=device,
                            set_train_mode=strategy.set_train_mode)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_range_test(result, out / "lr_find.png", f"{config.model}, {strategy.name}")
    summary = {"suggested_lr": result.suggestion, "lrs": result.lrs, "losses": result.losses, "plot": str(plot)}
    (out / "lr_find.json").write_text(json.dumps(summary, indent=1))
    return summary
