"""Statistics of multi-turn sessions (``load=sessions``): by turn index, and by session.

By turn (MLflow series, step = turn: a chart of latency or TTFT against the turn shows what a server's
prefix cache does as the history grows): ``turns/latency_p50``, ``turns/ttft_p50``, ``turns/prompt_tokens_mean``,
``turns/calls``. By session: how many, how many completed (every turn answered), how many ended by a
failed turn, and how long a completed one took (first send to last answer, think times included).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pikeclient.core.statistics import percentile


@dataclass
class _Session:
    first: float
    last: float
    turns: int  # the conversation's length
    answered: int = 0
    failed: bool = False
    processes: set[float] = field(default_factory=set)  # a resumed session ran in more than one


@dataclass
class TurnStats:
    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttfts: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    prompt_tokens: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    sessions: dict[str, _Session] = field(default_factory=dict)
    not_sent: int = 0  # turns after a failed turn, never sent

    def add(self, record: dict[str, Any]) -> None:
        """One call of a session (records with ``session_id`` and ``turn``); cached answers are no measurement."""
        if record.get("cached"):
            return
        turn = int(record["turn"])
        start, end = record["start_time"], record.get("end_time") or record["start_time"]
        session = self.sessions.get(record["session_id"])
        if session is None:
            session = self.sessions[record["session_id"]] = _Session(start, end, int(record.get("turns") or turn))
        session.first, session.last = min(session.first, start), max(session.last, end)
        session.processes.add(record.get("session", 0))
        if record["error"] is not None:
            session.failed = True
            return
        session.answered += 1
        self.latencies[turn].append(record["latency_s"])
        if record.get("ttft_s") is not None:
            self.ttfts[turn].append(record["ttft_s"])
        if record["usage"].get("prompt_tokens") is not None:
            self.prompt_tokens[turn].append(record["usage"]["prompt_tokens"])

    def metrics(self) -> dict[str, float]:
        if not self.sessions:
            return {}
        complete = [s for s in self.sessions.values() if s.answered >= s.turns]
        out: dict[str, float] = {
            "sessions/count": len(self.sessions),
            "sessions/completed": len(complete),
            "sessions/failed": sum(s.failed and s.answered < s.turns for s in self.sessions.values()),
            "sessions/turns_not_sent": self.not_sent,
            "sessions/turns_mean": sum(s.turns for s in self.sessions.values()) / len(self.sessions),
        }
        durations = [s.last - s.first for s in complete if len(s.processes) == 1]  # one process: no pause inside
        if durations:
            out["sessions/duration_s_mean"] = sum(durations) / len(durations)
            out["sessions/duration_s_max"] = max(durations)
            out.update({f"sessions/duration_s_p{q}": percentile(durations, q) for q in (50, 90, 99)})
        return out

    def summary_rows(self) -> list[tuple[str, str]]:
        """Rows of the run's summary table: sessions, and latency (TTFT when streaming) by turn."""
        if not self.sessions:
            return []
        m = self.metrics()
        rows = [("sessions completed / all", f"{m['sessions/completed']:.0f} / {m['sessions/count']:.0f}"
                                             + (f" ({m['sessions/failed']:.0f} ended by a failed turn)"
                                                if m["sessions/failed"] else ""))]
        name, values = ("TTFT", self.ttfts) if self.ttfts else ("latency", self.latencies)
        if len(values) > 1:
            rows.append((f"{name} p50 by turn (s)", ", ".join(f"{t}: {percentile(v, 50):.3f}"
                                                              for t, v in sorted(values.items()))))
        return rows

    def series(self) -> dict[str, dict[int, float]]:
        """Metric series by turn (step = turn index)."""
        out: dict[str, dict[int, float]] = {
            "turns/latency_p50": {t: percentile(v, 50) for t, v in sorted(self.latencies.items())},
            "turns/calls": {t: len(v) for t, v in sorted(self.latencies.items())},
            "turns/ttft_p50": {t: percentile(v, 50) for t, v in sorted(self.ttfts.items())},
            "turns/prompt_tokens_mean": {t: sum(v) / len(v) for t, v in sorted(self.prompt_tokens.items())},
        }
        return {name: values for name, values in out.items() if values}
