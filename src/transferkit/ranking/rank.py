"""Rank candidate backbones for a dataset before fine-tuning any: transferability scores from frozen
features, the cost of each candidate, and (optionally) a check of the ranking by fine-tuning some.

data -> stratified sample -> per candidate: load, features (feature cache), scores, cost -> table,
rank.json, score-vs-cost plot with the Pareto front -> --validate K: fine-tune the top K and the
bottom one, report Kendall tau and weighted tau between each estimator and the accuracies reached.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones.registry import RANDOM_PREFIX, create_backbone
from ..config import RunConfig
from ..data.dataset import encode_labels
from ..data.in_memory import accepts_tables
from ..data.splits import load_splits, subsample
from ..engine.checkpoint import atomic_write_text
from ..engine.cpu_memory import keep_freed_memory_for_reuse
from ..engine.feature_cache import cached_features, compute_features
from ..engine.loop import default_device
from ..errors import UserError
from ..model import Classifier
from ..strategies import create_strategy
from . import hscore, knn, leep, logme, nce  # noqa: F401  (registers the estimators)
from .cost import profile_cost
from .registry import ESTIMATORS, NotApplicable


PREFERRED_ORDER = ["nleep", "logme", "hscore", "knn", "leep", "nce"]


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


LAYERS = re.compile(r"^(?P<model>.+)@layers=(?P<layers>\d+)$")


def parse_candidate(candidate: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@layers=K`` (NAME cut to its K lowest layers or blocks: a cheaper candidate of the
    same family, so the ranking also answers "how deep a model do I need?")."""
    match = LAYERS.match(candidate)
    if match is None:
        if "@" in candidate:
            raise UserError(f"candidate '{candidate}': write NAME@layers=K to keep the K lowest layers of NAME "
                            f"(e.g. minilm-l6@layers=3)")
        return candidate, None
    layers = int(match["layers"])
    if layers < 1:
        raise UserError(f"candidate '{candidate}': keep at least 1 layer")
    return match["model"], layers


def depth_families(models: list[str]) -> dict[str, list[int | None]]:
    """Pretrained candidates that are one model at several depths (NAME, NAME@layers=K, ...), by NAME: the
    deepest of them computes the features of all in one pass over its layers. Random-weight copies are
    initialised one by one, so a cut one is not the bottom of another."""
    families: dict[str, list[int | None]] = {}
    for candidate in models:
        model_name, layers = parse_candidate(candidate)
        if not model_name.startswith(RANDOM_PREFIX) and layers not in families.get(model_name, []):
            families.setdefault(model_name, []).append(layers)
    return {model_name: depths for model_name, depths in families.items() if len(depths) > 1}


def processing_order(models: list[str]) -> list[str]:
    """The candidates in the order given, except that each depth family is scored together, deepest first."""
    families, ordered = depth_families(models), []
    for candidate in models:
        model_name, _ = parse_candidate(candidate)
        if model_name not in families:
            ordered.append(candidate)
        elif not any(parse_candidate(done)[0] == model_name for done in ordered):
            members = [m for m in models if parse_candidate(m)[0] == model_name]
            ordered += sorted(members, key=lambda m: -(parse_candidate(m)[1] or 10**9))
    return ordered


def _agrees_with_own_pass(backbone, prepared, features: torch.Tensor, device: torch.device, examples: int = 8) -> bool:
    """Whether the features a deeper copy computed for this cut candidate match its own forward pass on a few
    examples (they do unless the encoder adds something after its last layer, such as a final norm)."""
    indices = list(range(min(examples, len(features))))
    backbone.eval().to(device)
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in backbone.collate(prepared, indices).items()}
        own = backbone(**inputs).float().cpu()
    return bool(torch.allclose(own, features[indices], rtol=1e-3, atol=1e-4))


def _score_candidate(name: str, config: RunConfig, sample, classes: list[str], estimators: list[str],
                     cache: Path, device: torch.device, profiles: dict | None = None,
                     shared: dict | None = None, family: list[int | None] | None = None) -> dict[str, Any]:
    """One row of the table; a candidate that cannot be loaded or used gets its reason instead. ``profiles``
    holds the cost profiles measured so far, by architecture: a random-weight control costs exactly what its
    pretrained twin costs (same layers, same inputs), so one of them is measured. ``family``: the depths at
    which the candidates of this model are ranked (see ``depth_families``); the deepest leaves the features
    of the others in ``shared``, keyed by (model, layers)."""
    row: dict[str, Any] = {"model": name, "scores": {}, "not_applicable": {}}
    started = time.time()
    model_name, layers = parse_candidate(name)
    try:
        backbone = create_backbone(model_name, image_size=config.image_size, max_length=config.max_length,
                                   pooling=config.pooling, allow_pickle=config.allow_pickle)
        if layers is not None:
            backbone.keep_bottom_layers(layers)
    except UserError as error:
        return {**row, "error": str(error)}
    except Exception as error:  # a broken third-party checkpoint must not stop the other candidates
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
    if backbone.modality != sample.modality:
        return {**row, "error": f"takes {backbone.modality}s but the data are {sample.modality}s"}
    prepared = backbone.prepare(sample.inputs)
    shared = {} if shared is None else shared
    features = shared.pop((model_name, layers), None)
    if features is not None:
        if _agrees_with_own_pass(backbone, prepared, features, device):
            row["features_from"] = "one pass of the family's deepest candidate"
        else:
            features = None
    own_depth = backbone.depth()
    lower = sorted({d for d in (family or []) if d is not None and own_depth is not None and d < own_depth})
    if features is None and lower:
        depths = [own_depth, *lower]  # the features at every depth side by side, from one pass
        by_depth = compute_features(backbone, prepared, config.eval_batch_size,
                                    f"features (sample, depths {', '.join(map(str, depths))})", device,
                                    forward=lambda inputs: backbone.features_by_depth(depths=depths, **inputs))
        own, *parts = torch.split(by_depth, backbone.depth_widths(depths), dim=1)
        features = own.contiguous()
        for depth, part in zip(lower, parts):
            shared[(model_name, depth)] = part.contiguous()
    elif features is None:
        features = cached_features(cache / _folder_name(name), "sample", backbone, prepared, config.eval_batch_size,
                                   device)
    labels = encode_labels(sample.labels, classes)
    source = backbone.source_probabilities(features.to(device))
    source = None if source is None else source.cpu().numpy()
    f = features.numpy()
    for estimator in estimators:
        try:
            row["scores"][estimator] = ESTIMATORS[estimator](f, labels, source)
        except NotApplicable as reason:
            row["scores"][estimator] = None
            row["not_applicable"][estimator] = str(reason)
    row["rank_seconds"] = time.time() - started
    model = Classifier(backbone, len(classes), config.dropout)
    strategy = create_strategy(config)
    strategy.prepare(model)
    strategy.apply(model)
    first_32 = list(range(min(32, len(sample))))
    architecture = (model_name.removeprefix(RANDOM_PREFIX), layers)
    started = time.time()
    if profiles is not None and architecture in profiles:
        twin, cost = profiles[architecture]
        row["cost"], row["cost_measured_as"] = dict(cost), twin
    else:
        row["cost"] = profile_cost(model, strategy, backbone.collate(prepared, [0]), backbone.collate(prepared, first_32),
                                   device)
        if profiles is not None:
            profiles[architecture] = (name, row["cost"])
    row["cost_seconds"] = time.time() - started
    row["feature_dim"] = int(f.shape[1])
    return row


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, score) points no other point beats on both (lower cost, higher score)."""
    front = []
    for i, (cost_i, score_i) in enumerate(points):
        dominated = any(cost_j <= cost_i and score_j >= score_i and (cost_j < cost_i or score_j > score_i)
                        for j, (cost_j, score_j) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def rank_correlations(scores: list[float], accuracies: list[float]) -> dict[str, float | None]:
    """Kendall tau and weighted tau (top ranks weigh more) between scores and fine-tuned accuracies."""
    from scipy.stats import kendalltau, weightedtau

    if len(scores) < 3:
        return {"kendall_tau": None, "weighted_tau": None}
    taus = {"kendall_tau": float(kendalltau(scores, accuracies).statistic),
            "weighted_tau": float(weightedtau(scores, accuracies).statistic)}
    # Undefined (NaN) when all accuracies or all scores tie: there is no order to agree with.
    return {name: (None if np.isnan(value) else value) for name, value in taus.items()}


def _validate(rows: list[dict], config: RunConfig, by: str, k: int, sample_size: int, out: Path,
              estimators: list[str], lrs: list[float] | None = None, seeds: int = 1) -> dict[str, Any]:
    """Fine-tune the top k (and the bottom one) with a short budget; correlate every estimator with it.

    With ``lrs``, each candidate is fine-tuned once per learning rate and keeps the one its validation
    accuracy chooses, as in the protocol of You et al. (LogME, ICML 2021): one LR for every candidate
    measures the recipe as much as the model (a static embedding table and a transformer want LRs an
    order of magnitude apart).

    With ``seeds`` > 1, the chosen rate is run again with seeds ``seed + 1``, ... and the candidate's accuracy
    is the mean over seeds: candidates of one family often end within a seed's spread of each other, and a
    one-seed accuracy then orders them by chance (two runs of our Fashion-MNIST zoo, one seed each, gave
    N-LEEP weighted taus of 0.87 and 0.39 with the same scores)."""
    from ..finetune import finetune

    ranked = [r for r in rows if r["scores"].get(by) is not None]
    chosen = ranked[:k] + ([ranked[-1]] if len(ranked) > k else [])
    grid = list(lrs) if lrs else [config.lr]
    for row in chosen:
        model_name, layers = parse_candidate(row["model"])

        def fine_tune(lr: float, seed: int, folder: str) -> dict[str, Any]:
            metrics = finetune(config.replace(model=model_name, keep_layers=layers, baseline=False, lr=lr, seed=seed,
                                              out=str(out / "validate" / folder), max_train_examples=sample_size),
                               overwrite=True)
            best = metrics["history"][metrics["best_epoch"] - 1] if metrics["history"] else {}
            return {"lr": lr, "val_accuracy": best.get("val_accuracy"), "test_accuracy": metrics["test"]["accuracy"],
                    "seconds": metrics["seconds"]}

        runs = []
        for lr in grid:
            print(f"validating the ranking: fine-tuning {row['model']}" + (f" at lr {lr:g}" if len(grid) > 1 else ""),
                  flush=True)
            runs.append(fine_tune(lr, config.seed, _folder_name(row["model"]) + (f"-lr{lr:g}" if len(grid) > 1 else "")))
        # max keeps the first of equal values; a run without a validation score loses to one with it
        pick = max(runs, key=lambda r: -1.0 if r["val_accuracy"] is None else r["val_accuracy"])
        for seed in range(config.seed + 1, config.seed + seeds):
            print(f"validating the ranking: fine-tuning {row['model']} at lr {pick['lr']:g}, seed {seed}", flush=True)
            runs.append({**fine_tune(pick["lr"], seed, f"{_folder_name(row['model'])}-seed{seed}"), "seed": seed})
        accuracies = [pick["test_accuracy"]] + [r["test_accuracy"] for r in runs if "seed" in r]
        row["fine_tuned_accuracy"] = float(np.mean(accuracies))
        if seeds > 1:
            row["fine_tuned_accuracies"], row["fine_tuned_accuracy_std"] = accuracies, float(np.std(accuracies))
        row["fine_tune_seconds"] = sum(r["seconds"] for r in runs)
        # what fine-tuning the candidate once per rate costs, without the extra seeds that only firm up the check
        row["fine_tune_grid_seconds"] = sum(r["seconds"] for r in runs if "seed" not in r)
        if len(grid) > 1 or seeds > 1:
            row["fine_tune_lr"], row["fine_tune_runs"] = pick["lr"], runs
    correlations = {}
    for estimator in estimators:
        pairs = [(r["scores"][estimator], r["fine_tuned_accuracy"]) for r in chosen if r["scores"].get(estimator) is not None]
        correlations[estimator] = {**rank_correlations([p[0] for p in pairs], [p[1] for p in pairs]), "candidates": len(pairs)}
    return {"fine_tuned": [r["model"] for r in chosen], "correlations": correlations, "lrs": grid, "seeds": seeds,
            "rank_seconds": sum(r["rank_seconds"] for r in chosen),
            "cost_seconds": sum(r["cost_seconds"] for r in chosen),
            "fine_tune_seconds": sum(r["fine_tune_seconds"] for r in chosen),
            "fine_tune_grid_seconds": sum(r["fine_tune_grid_seconds"] for r in chosen)}


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def tied_estimators(result: dict[str, Any]) -> list[str]:
    """Estimators whose scores of two or more candidates all agree to 1e-6 (relative): they saturate, as N-LEEP
    does on data so easy that every candidate's features separate the classes perfectly."""
    tied = []
    for estimator in result["estimators"]:
        scores = [row["scores"][estimator] for row in result["candidates"]
                  if "error" not in row and row["scores"].get(estimator) is not None]
        if len(scores) >= 2 and max(scores) - min(scores) <= 1e-6 * max(1.0, abs(max(scores))):
            tied.append(estimator)
    return tied


def rank_table(result: dict[str, Any]) -> str:
    estimators = result["estimators"]
    head = ["rank", "model", *estimators, "params", "trainable", "GFLOPs/ex", "ms @1", "ms @32", "peak MiB"]
    grid = len((result.get("validation") or {}).get("lrs", [])) > 1
    if result.get("validation"):
        head += ["fine-tuned acc"] + (["chosen lr"] if grid else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for position, row in enumerate(result["candidates"], start=1):
        if "error" in row:
            lines.append(f"| - | {row['model']} | failed: {row['error']} |" + " |" * (len(head) - 3))
            continue
        cost = row["cost"]
        cells = [str(position), row["model"], *(_format(row["scores"][e]) for e in estimators),
                 f"{cost['total_parameters'] / 1e6:.2f}M", f"{cost['trainable_parameters'] / 1e6:.3g}M",
                 f"{cost['flops_per_example'] / 1e9:.3g}", f"{cost['latency_ms_batch_1']:.1f}",
                 f"{cost['latency_ms_batch_32']:.1f}", f"{cost['peak_memory_mib']:.0f}"]
        if result.get("validation"):
            spread = row.get("fine_tuned_accuracy_std")
            cells.append(_format(row.get("fine_tuned_accuracy")) + ("" if spread is None else f" +- {spread:.4f}"))
            if grid:
                cells.append(f"{row['fine_tune_lr']:g}" if "fine_tune_lr" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{e}: {reason}" for row in result["candidates"] for e, reason in row.get("not_applicable", {}).items()})
    if notes:
        lines += ["", "n/a: " + "; ".join(notes)]
    tied = tied_estimators(result)
    if tied:
        lines += ["", f"tied: {', '.join(tied)} give{'s' if len(tied) == 1 else ''} every candidate the same score (to "
                  f"rounding): on this sample {'it tells' if len(tied) == 1 else 'they tell'} them apart no better than "
                  f"chance, so an order by {'it' if len(tied) == 1 else 'them'} means nothing; order by another "
                  f"estimator (--by), or rank on a larger or harder sample"]
    validation = result.get("validation")
    if validation:
        how = (f" (each at lr {', '.join(f'{lr:g}' for lr in validation['lrs'])}, keeping the one validation chose)"
               if grid else "")
        if validation.get("seeds", 1) > 1:
            how += f", accuracy the mean over {validation['seeds']} seeds"
        lines += ["", f"Ranking checked by fine-tuning {', '.join(validation['fine_tuned'])}{how}:", "",
                  "| estimator | Kendall tau | weighted tau | candidates |", "|---|---|---|---|"]
        for estimator, c in validation["correlations"].items():
            lines.append(f"| {estimator} | {_format(c['kendall_tau'])} | {_format(c['weighted_tau'])} | {c['candidates']} |")
    return "\n".join(lines)


@accepts_tables("rank()")
def rank(models: list[str], *, sample: int = 1000, validate: int = 0, validate_examples: int | None = None,
         validate_lrs: list[float] | None = None, validate_seeds: int = 1, by: str = "nleep", estimators: list[str] | None = None,
         out: str = "runs/rank", overwrite: bool = False, **fields: Any) -> dict[str, Any]:
    """Score ``models`` on the data of ``fields`` (``train=``, ``text_column=``, ... as in ``finetune``).

    ``validate=K`` fine-tunes the top K and the bottom candidate on ``validate_examples`` training
    examples (default: ``sample``) with the fine-tuning fields given (``strategy``, ``epochs``, ``lr``...);
    ``validate_lrs`` fine-tunes each of them once per learning rate and keeps the one validation chooses;
    ``validate_seeds=N`` runs the chosen rate with N seeds and correlates with the mean accuracy.

    Example::

        transferkit.rank(["efficientnet-lite0", "efficientnet-lite1"], train="photos/", sample=500)

    As in ``finetune``, ``train`` (``val``, ``test``) may be a DataFrame, a ``datasets.Dataset`` or a dict of columns.
    """
    started = time.time()
    keep_freed_memory_for_reuse()
    estimators = list(estimators or sorted(ESTIMATORS, key=lambda e: (PREFERRED_ORDER + [e]).index(e)))
    unknown = [e for e in estimators + [by] if e not in ESTIMATORS]
    if unknown:
        raise UserError(f"unknown estimator '{unknown[0]}': choose from {', '.join(ESTIMATORS)}")
    if by not in estimators:
        estimators.insert(0, by)
    if len(models) < 1 or any(not m.strip() for m in models):
        raise UserError("--models needs a comma-separated list of candidate models, e.g. minilm-l6,random:minilm-l6")
    for candidate in models:
        parse_candidate(candidate.strip())  # a malformed candidate is the user's mistake, not a failed load
    if sample < 2:
        raise UserError(f"--sample is {sample}: it must be at least the number of classes (and at least 2)")
    if validate < 0:
        raise UserError(f"--validate is {validate}: give how many top candidates to fine-tune (0 for none)")
    if validate_lrs is not None and (not validate_lrs or any(not (lr > 0) for lr in validate_lrs)):
        raise UserError(f"--validate-lr is {validate_lrs}: give positive learning rates, e.g. 1e-4,3e-4,1e-3")
    if not isinstance(validate_seeds, int) or validate_seeds < 1:
        raise UserError(f"--validate-seeds is {validate_seeds}: give how many seeds to average (1 or more)")
    if validate_seeds > 1 and not validate:
        raise UserError("--validate-seeds averages the validation fine-tunes over seeds: add --validate K (how many "
                        "to fine-tune)")
    if validate_lrs and not validate:
        raise UserError("--validate-lr sets the rates of the validation fine-tunes: add --validate K (how many to fine-tune)")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {out_dir} already exists: choose another --out or pass --overwrite")
    config = RunConfig.from_dict({**fields, "model": parse_candidate(models[0].strip())[0], "out": str(out_dir)},
                                 source="rank")
    splits = load_splits(config)
    if sample < len(splits.classes):
        raise UserError(f"--sample is {sample} but the data have {len(splits.classes)} classes: "
                        f"sample at least one example per class (more is better, e.g. {20 * len(splits.classes)})")
    chosen = subsample(splits.train, sample, config.seed)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = default_device()
    rows, profiles, shared = [], {}, {}
    models = [m.strip() for m in models]
    families = depth_families(models)
    for name in processing_order(models):
        print(f"ranking {name}", flush=True)
        rows.append(_score_candidate(name, config, chosen, splits.classes, estimators, out_dir / "cache", device,
                                     profiles, shared, families.get(parse_candidate(name)[0])))
        if "error" in rows[-1]:
            print(f"transferkit: warning: candidate {name} skipped: {rows[-1]['error']}", file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise UserError("no candidate could be scored: " + "; ".join(f"{r['model']}: {r['error']}" for r in rows))
    ok.sort(key=lambda r: (r["scores"][by] is None, -(r["scores"][by] or 0.0)))
    result: dict[str, Any] = {"data": chosen.source, "sample": len(chosen), "classes": splits.classes,
                              "by": by, "estimators": estimators, "strategy": config.strategy,
                              "candidates": ok + [r for r in rows if "error" in r],
                              # the whole command before any fine-tuning: data loading, scoring, cost profiles
                              "ranking_wall_seconds": time.time() - started}
    if validate:
        result["validation"] = _validate(ok, config, by, validate, validate_examples or sample, out_dir, estimators,
                                         validate_lrs, validate_seeds)
    from ..evaluation.plots import plot_score_vs_cost

    scored = [r for r in ok if r["scores"][by] is not None]
    points = [(r["cost"]["flops_per_example"], r["scores"][by]) for r in scored]
    front = pareto_front(points)
    for i, row in enumerate(scored):
        row["pareto"] = i in front
    result["plot"] = str(plot_score_vs_cost([r["model"] for r in scored], points, front, out_dir / "rank.png", by))
    shutil.rmtree(out_dir / "cache", ignore_errors=True)
    atomic_write_text(out_dir / "rank.json", json.dumps(result, indent=1))
    return result
