"""Evaluation: metrics, plots and the run report."""

from .metrics import full_report, summary_metrics

__all__ = ["full_report", "summary_metrics"]
