"""Shared by the benchmarks: the machine and versions, and appending results to bench/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cores = os.cpu_count()
    versions = []
    for name in ("openai", "mlflow", "torch", "transformers"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{platform.machine()} {cores} cores, Python {platform.python_version()}; " + ", ".join(versions)


def append(title: str, rows: list[tuple[str, str]], notes: str = "") -> str:
    """Append a dated section to RESULTS.md and return its text."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title} ({now})", "", f"Machine: {machine()}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by a bench script; newest last.\n\n")
    with RESULTS.open("a") as f:
        f.write(text)
    return text


def emit(title: str, rows: list[tuple[str, str]], *, to_results: bool) -> None:
    """Print the figures; with ``to_results`` also append them to RESULTS.md."""
    print(append(title, rows) if to_results else "\n".join(f"{k}: {v}" for k, v in rows))


def command_line(doc: str, **defaults: int | float | str) -> argparse.ArgumentParser:
    """A benchmark's options: ``--name`` per default (typed like it), and ``--no-append`` (print only)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--no-append", action="store_true", help="print only; do not touch RESULTS.md")
    return parser
