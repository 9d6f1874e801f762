"""A model card (``RUN/README.md``): what the model was trained on, how, how well, and what not to use it for.

Written from the run's own ``config.yaml``, ``metrics.json`` and, once exported, ``export.json``, so
it never states a number the run did not measure. Follows the sections of Mitchell et al. 2019,
"Model Cards for Model Reporting", cut down to what a fine-tuning run knows.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..engine.checkpoint import atomic_write_text


def _pct(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "n/a"


def _is_text(run: Path) -> bool:
    directory = run / "model"
    if not (directory / "transferkit.json").is_file():
        return False
    meta = json.loads((directory / "transferkit.json").read_text())
    if meta.get("kind") == "ensemble":
        meta = json.loads((directory / meta["members"][0] / "transferkit.json").read_text())
    return meta["backbone"].get("family") == "hf-text"


def model_card(run: Path) -> str:
    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    export = json.loads((run / "export.json").read_text()) if (run / "export.json").is_file() else None
    data = metrics.get("data", {})
    classes = data.get("classes", [])
    test = metrics.get("test", {})
    baseline = (metrics.get("baseline") or {}).get("test", {})
    is_ensemble = bool(metrics.get("members"))
    lines = [f"# Model card: {run.name}", ""]
    if is_ensemble:
        lines += [f"An ensemble ({metrics.get('ensemble', {}).get('method')}) of {len(metrics['members'])} classifiers "
                  f"fine-tuned with transferkit; each member's own model card is in its run directory.", "",
                  f"- classes ({len(classes)}): {', '.join(f'`{c}`' for c in classes[:50])}{' ...' if len(classes) > 50 else ''}"]
    else:
        lines += [f"A classifier fine-tuned with transferkit from the pretrained model `{metrics.get('model', config.get('model'))}` "
                  f"with the `{metrics.get('strategy', config.get('strategy'))}` strategy.", "",
                  "## Training data", "",
                  f"- training file: `{data.get('train_source', config.get('train'))}`",
                  f"- examples: {data.get('train', '?')} train, {data.get('val', '?')} validation, {data.get('test', '?')} test",
                  f"- classes ({len(classes)}): {', '.join(f'`{c}`' for c in classes[:50])}{' ...' if len(classes) > 50 else ''}",
                  "", "## Training", "",
                  f"- strategy `{metrics.get('strategy')}`: {metrics.get('trainable_parameters', 0):,} of "
                  f"{metrics.get('total_parameters', 0):,} parameters trained",
                  f"- learning rate {config.get('lr')}, {config.get('epochs')} epochs at most, batch {config.get('batch_size')}, "
                  f"seed {config.get('seed')}; best epoch {metrics.get('best_epoch', '?')} chosen on the validation split",
                  f"- training time {metrics.get('seconds', 0):.0f} s; the full configuration is in `config.yaml`"]
        if metrics.get("distillation"):
            d = metrics["distillation"]
            lines.append(f"- distilled from the teacher `{d['teacher']}` (alpha {d['alpha']}, temperature {d['temperature']}): "
                         f"teacher test accuracy {_pct(d['teacher_test']['accuracy'])}, {d['speedup']:.1f}x the student's latency")
    lines += ["", f"## Evaluation (held-out test split, {data.get('test', '?')} examples)", "",
              "| model | accuracy | macro-F1 |", "|---|---|---|",
              f"| {'ensemble' if is_ensemble else 'fine-tuned'} | {_pct(test.get('accuracy'))} | {_pct(test.get('macro_f1'))} |"]
    if baseline:
        lines.append(f"| linear probe on the frozen pretrained features | {_pct(baseline.get('accuracy'))} | "
                     f"{_pct(baseline.get('macro_f1'))} |")
    if is_ensemble:
        ensemble = metrics.get("ensemble", {})
        lines += [f"| member `{m['run']}` | {_pct(m['accuracy'])} | {_pct(m['macro_f1'])} |" for m in metrics["members"]]
        if ensemble.get("val"):
            lines += ["", f"The combination was fitted on `{ensemble['val']}` only; the test file was predicted once."]
    lines += ["", "Per-class precision, recall and the confusion matrix are in `metrics.json`"
              + (" and `report.html`." if (run / "report.html").is_file() else ".")]
    if export:
        lines += ["", "## Exported", "",
                  f"- `{Path(export['path']).name}`: ONNX opset {export['opset']} ({export['exporter']} exporter), "
                  f"{export['bytes'] / 1e6:.1f} MB{', LoRA/IA3 adapters merged' if export.get('adapters_merged') else ''}",
                  f"- checked in onnxruntime {export['onnxruntime']} against PyTorch {export['torch']}: largest logit "
                  f"difference {export['max_abs_diff']:.2g} (tolerance {export['tolerance']:g}) on batch shapes "
                  f"{export['checked_shapes']}"]
    lines += ["", "## Intended use", "",
              f"Predicting one of the {len(classes)} classes above for inputs like the training data: "
              f"`transferkit predict {run} --input FILE --output preds.csv`, or over HTTP with "
              f"`transferkit serve {run}`.",
              "", "## Limitations", "",
              "- The test accuracy holds for data drawn like the test split; inputs from another domain, language "
              "or image source can score much lower. Check on a labelled sample of your own data with "
              f"`transferkit evaluate {run} --test FILE`.",
              "- The model always answers with one of the training classes, even for inputs that belong to none.",
              "- It inherits the biases of the pretrained model and of the training data; it has not been audited "
              "for fairness across groups of people.",
              "- Texts longer than the model's maximum length are truncated (the server says so per text)."
              if _is_text(run) else "- Images are resized (centre square) to the model's input size; fine detail can be lost."]
    return "\n".join(lines) + "\n"


def write_model_card(run: Path) -> Path:
    path = Path(run) / "README.md"
    atomic_write_text(path, model_card(run))
    return path
