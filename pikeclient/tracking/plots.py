"""Pictures of compared runs (``python -m pikeclient.tracking.report --plot / --curve / --quality``).

Legends sit beside or below the axes, never on the data; every axis starts at zero, so that two runs
are compared by their values, not by the fastest one.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pikeclient.tracking.process import SERIES_LATENCY
from pikeclient.tracking.report import Row


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _legend_below(fig: Any, handles: list, labels: list[str], width: int = 110) -> None:
    """The legend under the axes, one entry a line (long labels wrapped, never cut)."""
    if not handles:
        return
    wrapped = [textwrap.fill(label, width) for label in labels]
    lines = sum(label.count("\n") + 1 for label in wrapped)
    height = fig.get_figheight()
    room = min(0.6, (0.3 + 0.18 * lines) / height)  # inches of legend as a share of the figure
    fig.tight_layout(rect=(0, room, 1, 1))
    fig.legend(handles, wrapped, loc="lower left", bbox_to_anchor=(0.01, 0.01), fontsize=7, frameon=False)


def curve_points(rows: Sequence[Row]) -> dict[str, list[tuple[float, float, float, float, float | None]]]:
    """A saturation sweep's points per backend and model, in the order of the rate asked for:
    (completed requests/s, latency p50, p99, TTFT p50, rate asked for); NaN where a run lacks one."""
    nan = float("nan")
    lines: dict[str, list[Row]] = {}
    for row in rows:
        if row.completed_rate is not None and row.p50 is not None:
            lines.setdefault(f"{row.backend} {_short(row.model, 24)}", []).append(row)
    return {label: [(r.completed_rate, r.p50, nan if r.p99 is None else r.p99, nan if r.ttft is None else r.ttft,
                     r.requested_rate)
                    for r in sorted(points, key=lambda r: r.requested_rate or r.sent_rate or r.completed_rate or 0.0)]
            for label, points in lines.items()}


def saturation_curve(rows: Sequence[Row], path: Path) -> Path:
    """A saturation sweep's curve: completed requests/s (the throughput the server really gave) against
    latency p50/p99 and TTFT, one line per backend, points in the order of the rate asked for. Past
    capacity more requests go out but no more come back: the curve bends back. A dotted mark shows
    where p50 latency first exceeds twice its value at the lowest rate."""
    plt = _pyplot()
    lines = curve_points(rows)
    fig, (lat, first) = plt.subplots(1, 2, figsize=(12, 5.5))
    handles, labels = [], []
    for label, points in lines.items():
        x = [p[0] for p in points]
        (line,) = lat.plot(x, [p[1] for p in points], marker="o")
        (tail,) = lat.plot(x, [p[2] for p in points], marker="x", linestyle="--", color=line.get_color())
        handles += [line, tail]
        labels += [f"{label} p50", f"{label} p99"]
        for done, p50, _, _, asked in points:
            if asked is not None:
                lat.annotate(f"{asked:g}/s", (done, p50), fontsize=7, xytext=(4, 4), textcoords="offset points",
                             color=line.get_color())
        knee = next((p for p in points[1:] if p[1] > 2 * points[0][1]), None)
        if knee is not None:
            lat.axvline(knee[0], color=line.get_color(), linestyle=":", alpha=0.7)
        if any(p[3] == p[3] for p in points):  # some TTFT (NaN != NaN)
            first.plot(x, [p[3] for p in points], marker="o", color=line.get_color())
    axis_label = "completed requests / s (answers per second; labels: the rate asked for)"
    lat.set(xlabel=axis_label, ylabel="latency (s)", title="Saturation: latency vs throughput")
    first.set(xlabel=axis_label, ylabel="TTFT p50 (s)", title="Time to first token vs throughput")
    for axis in (lat, first):
        axis.set_ylim(bottom=0)
        axis.set_xlim(left=0)
    if lines:
        labels.append("dotted: p50 latency passes twice its lowest-rate value")
        handles.append(plt.Line2D([], [], color="gray", linestyle=":"))
    _legend_below(fig, handles, labels)
    return _save(fig, path)


def _short(text: str, width: int = 32) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def plot(client: MlflowClient, rows: Sequence[Row], path: Path) -> Path:
    """Left: median latency vs output tokens/s per run. Right: per-call latency per run (box plot).
    ``rows`` are labelled (``label_rows``); ``#`` numbers match the table's first column."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    handles, labels = [], []
    for index, row in enumerate(rows, start=1):
        if row.p50 is not None and row.tokens_per_s is not None:
            handles.append(left.scatter(row.tokens_per_s, row.p50, s=60))
            labels.append(f"#{index} {row.label}")
            left.annotate(f"#{index}", (row.tokens_per_s, row.p50), fontsize=9, xytext=(5, 5),
                          textcoords="offset points")
    left.set(xlabel="output tokens / s (run)", ylabel="latency p50 (s)", title="Throughput vs latency per run")
    left.set_ylim(bottom=0)
    left.set_xlim(left=0)
    series = [[m.value for m in client.get_metric_history(r.run_id, SERIES_LATENCY)] for r in rows]
    right.boxplot(series, showfliers=True)
    right.set_xticks(range(1, len(rows) + 1), [f"#{i}" for i in range(1, len(rows) + 1)])
    right.set(ylabel="latency per call (s)", title="Latency distribution per run")
    right.set_ylim(bottom=0)
    _legend_below(fig, handles, labels)
    return _save(fig, path)


def quality_points(rows: Sequence[Row]) -> tuple[str, list[tuple[int, Row, float, tuple[float, float] | None]]]:
    """What the quality picture plots per run: (``#``, row, quality, its 95% interval), and the quality's name:
    the share of answers right where runs graded pass/fail, else the one scorer's mean all runs have."""
    if any(r.pass_rate is not None for r in rows):
        return "answers right (share of graded)", [(i, r, r.pass_rate, r.pass_rate_ci)
                                                   for i, r in enumerate(rows, 1) if r.pass_rate is not None]
    common = set.intersection(*(set(r.quality) for r in rows)) if rows else set()
    if not common:
        return "", []
    name = sorted(common)[0]
    return f"{name} (mean)", [(i, r, r.quality[name], None) for i, r in enumerate(rows, 1)]


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: as cheap (or fast) or cheaper, as good or better, and
    strictly better in one. In order of x: the front a person chooses from."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox <= x and oy >= y and (ox, oy) != (x, y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


def quality_picture(rows: Sequence[Row], path: Path) -> Path:
    """Quality against cost (per 1,000 answers) and against latency p95, one point per run with its 95%
    interval; the runs no other run beats on both are joined (the Pareto front). ``rows`` are labelled."""
    plt = _pyplot()
    name, points = quality_points(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    priced = [(i, r, q, ci) for i, r, q, ci in points if r.cost is not None and r.measured]
    currency = next((r.currency for _, r, _, _ in priced), "")
    panels = [(axes[0], priced, lambda r: r.cost / r.measured * 1000, f"cost per 1,000 answers ({currency})",
               "Quality vs cost"),
              (axes[1], [p for p in points if p[1].p95 is not None], lambda r: r.p95, "latency p95 (s)",
               "Quality vs latency p95")]
    handles, labels = {}, {}
    for axis, found, x_of, xlabel, title in panels:
        if not found:
            axis.text(0.5, 0.5, "no run has a price (pricing.*)" if axis is axes[0] else "no latency",
                      ha="center", va="center", transform=axis.transAxes, color="gray")
        xy = [(x_of(r), q) for _, r, q, _ in found]
        names: dict[tuple[float, float], list[str]] = {}  # runs on the same spot share one mark
        for (index, row, quality, ci), (x, y) in zip(found, xy):
            error = None if ci is None else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]
            handle = axis.errorbar(x, y, yerr=error, fmt="o", capsize=3, color=f"C{(index - 1) % 10}")
            handles[index], labels[index] = handle, f"#{index} {row.label}"
            names.setdefault((x, y), []).append(f"#{index}")
        for (x, y), marks in names.items():
            axis.annotate(", ".join(marks), (x, y), fontsize=9, xytext=(5, 5), textcoords="offset points")
        front = [xy[i] for i in pareto(xy)]
        if len(front) > 1:
            axis.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", linestyle="--",
                      alpha=0.6)
        left_out = [f"#{i}" for i, *_ in points if i not in {j for j, *_ in found}]
        if found and left_out:
            axis.text(0.02, 0.97, f"not shown (no {'price' if axis is axes[0] else 'latency'}): {', '.join(left_out)}",
                      transform=axis.transAxes, va="top", fontsize=8, color="gray")
        axis.set(xlabel=xlabel, ylabel=name or "quality", title=title)
        axis.set_xlim(0, max((x for x, _ in xy), default=1.0) * 1.15 or 1.0)  # room for the marks' labels
        axis.set_ylim(0, 1.05 if all(0 <= q <= 1 for _, _, q, _ in points) else None)
    notes = [f"#{i} {r.label}" for i, r in enumerate(rows, 1) if i not in labels]
    order = sorted(labels)
    entries = [labels[i] for i in order] + ["dashed: runs no other run beats on both (cheaper or faster, and "
                                            "better)"] + [f"{note} (no quality)" for note in notes]
    _legend_below(fig, [handles[i] for i in order] + [plt.Line2D([], [], color="gray", linestyle="--")] +
                  [plt.Line2D([], [], linestyle="none")] * len(notes), entries)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
