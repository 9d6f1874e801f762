"""Shared by the benchmark scripts: the machine's description, saving results, and replacing one script's
section of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; numbers are from the runs recorded in bench/results/.\n\n"


def replace_section(heading: str, section: str) -> None:
    """Put ``section`` (which starts with ``heading``) in place of the old one, or append it."""
    text = DOC.read_text() if DOC.is_file() else HEADER
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        # A blank line always separates this section from the next, whatever the section's own ending.
        text = text[:start] + (section.rstrip("\n") + "\n\n" + text[end + 1:] if end >= 0 else section)
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def cpu_model() -> str:
    """The CPU's model name and its widest vector instructions (e.g. "AMD EPYC, AVX2"): the same 2-core budget
    ran at about 170 GFLOP/s fp32 on an AVX-512 machine and 141 on an AVX2-only one, so a table names it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in info.splitlines():  # the first processor's fields ("model name\t: ...")
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = " ".join(fields.get("model name", "").split()) or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    vector = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                             ("avx2", "AVX2"), ("neon", "NEON"), ("asimd", "NEON")) if flag in flags), None)
    return f"{name}, {vector}" if vector else name


def machine() -> str:
    """What the numbers were measured on, for every table's heading."""
    import torch

    return f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, torch {torch.__version__}"


def save_results(path: str | Path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))

