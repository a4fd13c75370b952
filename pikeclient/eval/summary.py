"""What people read of a run's quality: the summary's rows, from the run's metrics (``aggregate``'s names).

Used by the summary printed at the end of a run (``pikeclient.run.stats.format_summary``) and by the
report (``pikeclient.tracking.report``), which reads the same names back from MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping

from pikeclient.eval.evaluator import RESERVED


def scorer_names(metrics: Mapping[str, float]) -> list[str]:
    """The scorers a run's metrics hold (``<scorer>/count`` is logged for every scorer that scored)."""
    return sorted({key.rsplit("/", 1)[0] for key in metrics
                   if key.endswith("/count") and key.count("/") == 1 and key.split("/")[0] not in RESERVED})


def answers_right(metrics: Mapping[str, float]) -> str | None:
    """``14 of 19 graded (73.7%, 95% CI 52-89%)``, with the answers left ungraded; None without verdicts."""
    if "quality/passed" not in metrics:
        return None
    passed, failed, errors = (int(metrics[f"quality/{k}"]) for k in ("passed", "failed", "errors"))
    graded = passed + failed
    text = f"{passed} of {graded}"
    if graded:
        text += f" ({metrics['quality/pass_rate']:.1%}"
        if "quality/pass_rate_ci_low" in metrics:
            text += f", 95% CI {metrics['quality/pass_rate_ci_low']:.0%}-{metrics['quality/pass_rate_ci_high']:.0%}"
        text += ")"
    notes = []
    if errors:
        notes.append(f"{errors} not graded: a score could not be computed")
    unchecked = int(metrics.get("calls/ok", 0)) - graded - errors
    if unchecked > 0:
        notes.append(f"{unchecked} with nothing to check")
    return text + "".join(f"; {note}" for note in notes)


def quality_rows(metrics: Mapping[str, float]) -> list[tuple[str, str]]:
    """The summary's quality rows: answers right, then each scorer's mean with its 95% interval, then the
    judge's own calls (never part of the run's latency, tokens or cost)."""
    rows = []
    right = answers_right(metrics)
    if right is not None:
        rows.append(("answers right", right))
    for name in scorer_names(metrics):
        count, errors = int(metrics[f"{name}/count"]), int(metrics.get(f"{name}/errors", 0))
        value = "-"
        if f"{name}/mean" in metrics:
            value = f"{metrics[f'{name}/mean']:.3f}"
            if f"{name}/ci_low" in metrics:
                value += f" [{metrics[f'{name}/ci_low']:.3f}, {metrics[f'{name}/ci_high']:.3f}]"
        note = f"{count} scored" + (f", {errors} errors" if errors else "")
        rows.append((f"  {name} mean", f"{value} ({note})"))
    if "judge/calls" in metrics:
        cost = next((f", {v:.4f} {k.removeprefix('judge/cost_').upper()}" for k, v in metrics.items()
                     if k.startswith("judge/cost_")), "")
        rows.append(("judge calls / tokens", f"{metrics['judge/calls']:.0f} / {metrics['judge/tokens']:.0f}{cost}"
                                             f" ({metrics['judge/errors']:.0f} errors; not in the figures above)"))
    return rows
