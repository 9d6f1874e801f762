"""The run report: a Markdown file and a self-contained HTML file (plots embedded) with the same content."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def comparison_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Before (linear probe on frozen pretrained features) vs after (the fine-tuned model), on one test set."""
    rows = []
    if "baseline" in metrics:
        base = metrics["baseline"]
        rows.append(["linear probe (frozen pretrained features)", _fmt(base["test"]["accuracy"]),
                     _fmt(base["test"]["macro_f1"]), f"{base['seconds']:.1f}"])
    rows.append([f"{metrics['strategy']} (this run)", _fmt(metrics["test"]["accuracy"]),
                 _fmt(metrics["test"]["macro_f1"]), f"{metrics['seconds']:.1f}"])
    return rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: Path, metrics: dict[str, Any], plots: dict[str, Path]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``."""
    data = metrics["data"]
    facts = [
        ["model", metrics["model"]],
        ["strategy", metrics["strategy"]],
        ["trainable parameters", f"{metrics['trainable_parameters']:,} of {metrics['total_parameters']:,}"],
        ["train / val / test examples", f"{data['train']} / {data['val']} / {data['test']}"],
        ["classes", str(len(data["classes"]))],
        ["best epoch (validation)", str(metrics.get("best_epoch"))],
    ]
    comparison_header = ["model", "test accuracy", "test macro-F1", "train time (s)"]
    comparison = comparison_rows(metrics)
    per_class_header = ["class", "precision", "recall", "F1", "support"]
    per_class = [[c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1-score"]), str(int(v["support"]))]
                 for c, v in metrics["test"]["per_class"].items()]
    selection_note = ("Checkpoints and early stopping used the validation split only; the test split was "
                      "used once, after training.")

    md = [f"# Fine-tuning report: {metrics['model']} on {data['train_source']}", "",
          _markdown_table(["", ""], facts), "", "## Before vs after fine-tuning (test set)", "",
          _markdown_table(comparison_header, comparison), "", selection_note, "",
          "## Per-class results (test set)", "", _markdown_table(per_class_header, per_class), ""]
    for title, path in plots.items():
        md += [f"## {title}", "", f"![{title}]({path.relative_to(run_dir)})", ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))

    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'/>" for title, path in plots.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>transferkit report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>Fine-tuning report: {html.escape(metrics['model'])} on {html.escape(data['train_source'])}</h1>
{_html_table(["", ""], facts)}
<h2>Before vs after fine-tuning (test set)</h2>{_html_table(comparison_header, comparison)}<p>{selection_note}</p>
<h2>Per-class results (test set)</h2>{_html_table(per_class_header, per_class)}{images}</body></html>"""
    html_path = run_dir / "report.html"
    html_path.write_text(page)
    return md_path, html_path
