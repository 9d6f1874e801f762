"""Ensembles of finished runs: hard voting, probability averaging, validation-fitted weights, stacking, and
greedy weight soups.

Every combiner that learns something (``weighted``, ``stack``, ``soup``) learns it from the validation
file's predictions only; the test file is predicted once, at the end, to report. An ensemble is saved
as a run directory whose ``model/`` holds copies of its members, so it evaluates, predicts and serves
like any other run. A soup is a single model (the members' averaged weights) saved as an ordinary run.

Combiners are small classes in ``COMBINERS``; adding one is one class with ``fit`` and ``combine``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .data.dataset import Examples, encode_labels
from .engine.checkpoint import atomic_write_text
from .errors import UserError
from .evaluation.metrics import full_report
from .saved_model import FORMAT_VERSION, FineTunedModel, model_directory, save_classifier

COMBINERS: dict[str, type["Combiner"]] = {}


def register(cls):
    COMBINERS[cls.name] = cls
    return cls


class Combiner:
    """Turns the members' class probabilities, shape (members, N, classes), into the ensemble's."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs_validation: ClassVar[bool] = False

    def fit(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """Learn from validation predictions (no-op for fixed rules)."""

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Combiner":
        return cls()


@register
class Vote(Combiner):
    name = "vote"
    summary = "hard majority vote; ties go to the class with the higher mean probability"

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        members, n, k = probabilities.shape
        votes = np.zeros((n, k))
        np.add.at(votes, (np.arange(n)[None, :].repeat(members, 0), probabilities.argmax(2)), 1.0)
        # Vote shares, nudged by the mean probability: a majority always wins (shares differ by at least
        # 1/members > 1e-3), and only exact ties are decided by confidence.
        scores = 0.999 * votes / members + 0.001 * probabilities.mean(0)
        return scores / scores.sum(1, keepdims=True)


@register
class Average(Combiner):
    name = "average"
    summary = "mean of the members' class probabilities (soft voting)"

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities.mean(0)


@register
class Weighted(Combiner):
    """Weights on the simplex that minimise the validation log-loss of the weighted average
    (as in Caruana et al. 2004's ensemble selection, by direct optimisation rather than greedy search)."""

    name = "weighted"
    summary = "weighted average, weights fitted on validation (minimum log-loss)"
    needs_validation = True

    def __init__(self, weights: list[float] | None = None):
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)

    def fit(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        from scipy.optimize import minimize

        picked = probabilities[:, np.arange(len(labels)), labels]  # (members, N): each member's p(true class)

        def loss(logits):
            w = np.exp(logits - logits.max())
            w /= w.sum()
            return -np.log(np.clip(w @ picked, 1e-12, None)).mean()

        result = minimize(loss, np.zeros(len(probabilities)), method="L-BFGS-B")
        w = np.exp(result.x - result.x.max())
        self.weights = w / w.sum()

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        return np.tensordot(self.weights, probabilities, axes=1)

    def state(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Weighted":
        return cls(state["weights"])


@register
class Stack(Combiner):
    """Stacking (Wolpert 1992): a multinomial logistic regression on the members' log-probabilities,
    fitted on validation predictions. Its coefficients are stored as JSON (no pickle)."""

    name = "stack"
    summary = "logistic-regression meta-learner on the members' log-probabilities, fitted on validation"
    needs_validation = True

    def __init__(self, coef: list | None = None, intercept: list | None = None, classes_seen: list | None = None):
        self.coef = None if coef is None else np.asarray(coef)
        self.intercept = None if intercept is None else np.asarray(intercept)
        self.classes_seen = classes_seen

    @staticmethod
    def _features(probabilities: np.ndarray) -> np.ndarray:
        members, n, k = probabilities.shape
        return np.log(np.clip(probabilities, 1e-7, 1.0)).transpose(1, 0, 2).reshape(n, members * k)

    def fit(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        if len(np.unique(labels)) < 2:
            raise UserError("stacking needs at least two classes in the validation file")
        model = LogisticRegression(C=1.0, max_iter=2000).fit(self._features(probabilities), labels)
        self.coef, self.intercept, self.classes_seen = model.coef_, model.intercept_, model.classes_.tolist()

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        scores = self._features(probabilities) @ self.coef.T + self.intercept
        if scores.shape[1] == 1:  # binary: scikit-learn keeps one row, the log-odds of the second class
            scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
        scores = np.exp(scores - scores.max(1, keepdims=True))
        seen = scores / scores.sum(1, keepdims=True)
        # Classes missing from the validation file get probability 0.
        out = np.zeros((seen.shape[0], probabilities.shape[2]))
        out[:, self.classes_seen] = seen
        return out

    def state(self) -> dict[str, Any]:
        return {"coef": self.coef.tolist(), "intercept": self.intercept.tolist(), "classes_seen": self.classes_seen}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Stack":
        return cls(state["coef"], state["intercept"], state["classes_seen"])


METHODS = sorted([*COMBINERS, "soup"])


class EnsembleModel:
    """A saved ensemble: the members' predictions combined; the same interface as ``FineTunedModel``."""

    def __init__(self, members: list[FineTunedModel], combiner: Combiner, classes: list[str], source: Path):
        self.members = members
        self.combiner = combiner
        self.classes = classes
        self.source = source

    @classmethod
    def load(cls, directory: Path, meta: dict) -> "EnsembleModel":
        members = [FineTunedModel.load(directory / path) for path in meta["members"]]
        combiner = COMBINERS[meta["method"]].from_state(meta.get("combiner", {}))
        return cls(members, combiner, meta["classes"], directory)

    @property
    def modality(self) -> str:
        return self.members[0].modality

    @property
    def backbone_spec(self) -> dict:
        return {"family": "ensemble", "method": self.combiner.name,
                "members": [m.backbone_spec for m in self.members]}

    def truncated(self, texts) -> list[bool]:
        flags = [m.truncated(texts) for m in self.members]
        return [any(column) for column in zip(*flags)]

    def member_probabilities(self, inputs) -> np.ndarray:
        return np.stack([m.predict_proba(inputs) for m in self.members])

    def predict_proba(self, inputs) -> np.ndarray:
        return self.combiner.combine(self.member_probabilities(inputs))

    def predict_logits(self, inputs, progress: str | None = None) -> torch.Tensor:
        """Log-probabilities: logits up to a per-row constant, so an ensemble can teach a student."""
        return torch.from_numpy(self.predict_proba(inputs)).float().clamp_min(1e-8).log()

    def predict(self, inputs) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(inputs).argmax(1)]

    def parameter_count(self) -> int:
        return sum(m.parameter_count() for m in self.members)

    def read(self, path, **kwargs) -> Examples:
        return self.members[0].read(path, **kwargs)

    def evaluate(self, examples, **columns) -> dict:
        return FineTunedModel.evaluate(self, examples, **columns)  # the same checks and report; only predict_proba differs

    def merge_adapters(self) -> None:
        raise UserError(f"{self.source} is an ensemble of {len(self.members)} models: export its members one by one, "
                        f"or build a 'soup' ensemble, which is a single model")


def _load_members(runs: list[str]) -> list[FineTunedModel]:
    if len(runs) < 2:
        raise UserError(f"an ensemble needs at least two runs, got {len(runs)}")
    if len(set(map(str, runs))) != len(runs):
        raise UserError("the same run is listed twice: list each member once")
    members = [FineTunedModel.load(run) for run in runs]
    first = members[0]
    for run, member in zip(runs[1:], members[1:]):
        if member.modality != first.modality:
            raise UserError(f"{run} takes {member.modality}s but {runs[0]} takes {first.modality}s: "
                            f"ensemble members must solve the same task")
        if member.classes != first.classes:
            differ = sorted(set(member.classes) ^ set(first.classes))
            raise UserError(f"{run} was trained on other classes than {runs[0]} (differing: {differ[:10]}): "
                            f"ensemble members must share one label set")
    return members


def _soup(members: list[FineTunedModel], runs: list[str], val: Examples, val_labels: np.ndarray) -> tuple[FineTunedModel, dict]:
    """Greedy soup (Wortsman et al. 2022, "Model soups"): members sorted by validation accuracy, each
    added to the running weight average only if the soup's validation accuracy does not drop."""
    specs = []
    for member in members:
        member.merge_adapters()  # LoRA/IA3 folded in, so every member has the plain architecture's weights
        specs.append({k: v for k, v in member.model.backbone.spec.items() if k != "adapter"})
    shapes = [{k: tuple(v.shape) for k, v in m.model.state_dict().items()} for m in members]
    for run, spec, shape in zip(runs[1:], specs[1:], shapes[1:]):
        if spec != specs[0] or shape != shapes[0]:
            raise UserError(f"{run} has another architecture than {runs[0]}: a soup averages the weights of fine-tunes "
                            f"of one backbone; use --method average, weighted or stack instead")
    accuracies = [float((m.predict_proba(val.inputs).argmax(1) == val_labels).mean()) for m in members]
    order = list(np.argsort(accuracies)[::-1])
    states = [{k: v.detach().float().clone() for k, v in m.model.state_dict().items()} for m in members]
    soup = members[order[0]]
    ingredients, best = [int(order[0])], accuracies[order[0]]
    total = {k: v.clone() for k, v in states[order[0]].items()}
    for i in order[1:]:
        candidate = {k: (total[k] + states[i][k]) / (len(ingredients) + 1) for k in total}
        soup.model.load_state_dict(_cast_like(candidate, states[0]))
        accuracy = float((soup.predict_proba(val.inputs).argmax(1) == val_labels).mean())
        if accuracy >= best:
            ingredients.append(int(i))
            best = accuracy
            total = {k: total[k] + states[i][k] for k in total}
    soup.model.load_state_dict(_cast_like({k: v / len(ingredients) for k, v in total.items()}, states[0]))
    return soup, {"ingredients": [runs[i] for i in ingredients], "member_val_accuracy": accuracies,
                  "soup_val_accuracy": best}


def _cast_like(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Averaged weights back to each tensor's dtype (integer buffers such as BatchNorm's step count rounded)."""
    return {k: (v.round() if not reference[k].is_floating_point() else v).to(reference[k].dtype) for k, v in state.items()}


def build_ensemble(runs: list[str], *, test: str, out: str, method: str = "average", val: str | None = None,
                   text_column: str | None = None, image_column: str | None = None, label_column: str | None = None,
                   overwrite: bool = False) -> dict:
    """Combine finished runs; write ``out`` as a run directory; return its metrics (also ``metrics.json``)."""
    if method not in METHODS:
        raise UserError(f"unknown ensemble method '{method}': choose one of {', '.join(METHODS)}")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists: choose another --out or pass --overwrite")
    needs_val = method == "soup" or COMBINERS[method].needs_validation
    if needs_val and not val:
        raise UserError(f"--method {method} learns from validation predictions: pass --val FILE (never the test file)")
    if val and test and Path(val).resolve() == Path(test).resolve():
        raise UserError("--val and --test are the same file: the ensemble would be fitted on the data it is scored on")
    started = time.time()
    members = _load_members(runs)
    classes = members[0].classes

    def read(path):
        examples = members[0].read(path, text_column=text_column, image_column=image_column, label_column=label_column)
        unknown = sorted(set(examples.labels) - set(classes))
        if unknown:
            raise UserError(f"{path}: labels {unknown[:5]} are not classes of the members ({classes[:10]}): fix them")
        return examples, encode_labels(examples.labels, classes)

    test_examples, test_labels = read(test)
    val_examples, val_labels = read(val) if val else (None, None)
    # Each member predicts the test file once; its report and the combination both use these probabilities.
    test_probabilities = np.stack([m.predict_proba(test_examples.inputs) for m in members])
    member_reports = [full_report(test_labels, p.argmax(1), classes) for p in test_probabilities]
    member_test = [{"run": str(run), "accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
                   for run, r in zip(runs, member_reports)]
    best_member = max(member_test, key=lambda r: r["accuracy"])

    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {}
    if method == "soup":
        soup, details = _soup(members, runs, val_examples, val_labels)
        report = soup.evaluate(test_examples)
        save_classifier(soup.model.cpu(), classes, out_dir / "model", columns=members[0].columns)
    else:
        combiner = COMBINERS[method]()
        if val_examples is not None:
            val_probabilities = np.stack([m.predict_proba(val_examples.inputs) for m in members])
            combiner.fit(val_probabilities, val_labels)
            details["val_accuracy"] = float((combiner.combine(val_probabilities).argmax(1) == val_labels).mean())
        report = full_report(test_labels, combiner.combine(test_probabilities).argmax(1), classes)
        model_dir = out_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, run in enumerate(runs):
            # Copies, so the ensemble keeps working when the member runs are moved or deleted.
            shutil.copytree(model_directory(run), model_dir / "members" / str(i), dirs_exist_ok=True)
            paths.append(f"members/{i}")
        meta = {"format": FORMAT_VERSION, "kind": "ensemble", "method": method, "classes": classes,
                "members": paths, "combiner": combiner.state()}
        atomic_write_text(model_dir / "transferkit.json", json.dumps(meta, indent=1))
        details.update(combiner.state() if method == "weighted" else {})
    metrics = {"model": f"ensemble of {len(runs)}", "strategy": f"ensemble ({method})", "members": member_test,
               "best_member": best_member, "ensemble": {"method": method, "val": val, **details},
               "data": {"train_source": None, "val": len(val_examples.inputs) if val_examples else 0,
                        "test": len(test_labels), "classes": classes},
               "test": report, "seconds": time.time() - started,
               "gain_over_best_member": report["accuracy"] - best_member["accuracy"]}
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    from .deploy.model_card import write_model_card

    write_model_card(out_dir)
    return metrics
