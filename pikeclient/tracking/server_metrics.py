"""The server's side of a run: its Prometheus endpoint (``server_metrics.url``), scraped every interval.

vLLM, SGLang, TGI and llama.cpp's ``llama-server --metrics`` expose one; each names the same things
differently, so a flavour maps our names to its series (``FLAVOURS``; ``auto`` tells them apart by the
names the endpoint shows). The text is read with ``prometheus_client``'s parser. Gauges (requests
running and waiting, KV-cache usage) are logged as they were at each scrape; counters (tokens,
prefix-cache hits) as their growth per second since the scrape before, as ``server/...`` series on
the timeline's axis (step = seconds since the measured start). At the end the counters' growth over
the run is compared with pikeclient's own token totals: a difference is one warning (another client
of the same server, or a server that counts differently).

Scraping runs in a thread of its own, so a slow endpoint never delays a call. An endpoint that cannot
be read is one warning, never a failed run: the calls are what is measured.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from pikeclient.core.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "server/"
# our name -> the flavour's sample name (summed over its label sets: several models or engines)
FLAVOURS: dict[str, dict[str, str]] = {
    "vllm": {"requests_running": "vllm:num_requests_running", "requests_waiting": "vllm:num_requests_waiting",
             "kv_cache_usage": "vllm:kv_cache_usage_perc", "prompt_tokens": "vllm:prompt_tokens_total",
             "generation_tokens": "vllm:generation_tokens_total", "prefix_cache_hits": "vllm:prefix_cache_hits_total",
             "prefix_cache_queries": "vllm:prefix_cache_queries_total"},
    "sglang": {"requests_running": "sglang:num_running_reqs", "requests_waiting": "sglang:num_queue_reqs",
               "kv_cache_usage": "sglang:token_usage", "prompt_tokens": "sglang:prompt_tokens_total",
               "generation_tokens": "sglang:generation_tokens_total", "prefix_cache_hit_rate": "sglang:cache_hit_rate"},
    "tgi": {"requests_running": "tgi_batch_current_size", "requests_waiting": "tgi_queue_size",
            "prompt_tokens": "tgi_request_input_length_sum", "generation_tokens": "tgi_request_generated_tokens_sum"},
    "llamacpp": {"requests_running": "llamacpp:requests_processing", "requests_waiting": "llamacpp:requests_deferred",
                 "kv_cache_usage": "llamacpp:kv_cache_usage_ratio", "prompt_tokens": "llamacpp:prompt_tokens_total",
                 "generation_tokens": "llamacpp:tokens_predicted_total"},
}
# Older vLLM releases (before 0.10) name the KV-cache gauge for the GPU.
_ALIASES = {"vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc"}
GAUGES = ("requests_running", "requests_waiting", "kv_cache_usage", "prefix_cache_hit_rate")
COUNTERS = ("prompt_tokens", "generation_tokens")
MISMATCH = 0.02  # a token total further than this from pikeclient's own is worth a warning


def parse(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, by sample name, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _ALIASES.get(sample.name, sample.name)
            values[name] = values.get(name, 0.0) + sample.value
    return values


def detect(values: Mapping[str, float]) -> str | None:
    """The flavour whose running-requests series the page has."""
    return next((name for name, series in FLAVOURS.items() if series["requests_running"] in values), None)


class ServerScraper:
    """Scrapes ``url`` every ``interval_s`` seconds from :meth:`begin` to :meth:`stop`, in a thread."""

    def __init__(self, url: str, interval_s: float = 1.0, flavour: str = "auto", timeout_s: float = 2.0) -> None:
        if flavour != "auto" and flavour not in FLAVOURS:
            raise ConfigError(f"server_metrics.flavour={flavour!r}: allowed auto, {', '.join(FLAVOURS)}")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server_metrics.url={url!r}: give the endpoint's http(s) URL (vLLM: http://host:8000/metrics)")
        if not timeout_s > 0:
            raise ConfigError(f"server_metrics.timeout_s={timeout_s} is out of range: allowed > 0 (seconds)")
        self.url, self.interval_s, self.flavour, self.timeout_s = url, interval_s, flavour, timeout_s
        self.scrapes: list[tuple[float, dict[str, float]]] = []  # (seconds since the start, our names' values)
        self.start = 0.0
        self.warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, start_time: float) -> None:
        """The measured part begins (epoch seconds): scrape now, then every interval."""
        self.start = start_time
        self._thread = threading.Thread(target=self._loop, name="server-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Scrape once more (the counters' final values) and end the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(self.timeout_s + 5)
        self._thread = None
        if self.scrapes:
            self.scrape()

    def _loop(self) -> None:
        index = 0
        while not self._stop.is_set():
            if not self.scrape() and not self.scrapes:
                return  # never answered: one warning, and no more tries
            index += 1
            self._stop.wait(max(0.0, self.start + index * self.interval_s - time.time()))

    def scrape(self) -> bool:
        """Read the endpoint once; False (and one warning per run) when it cannot be read."""
        when = time.time() - self.start
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as response:
                values = parse(response.read().decode("utf-8", "replace"))
        except Exception as error:  # noqa: BLE001 - the server's side is extra: the run goes on
            self._warn(f"server_metrics.url={self.url} cannot be read ({type(error).__name__}: {error}); the run "
                       "goes on without the server's series")
            return False
        flavour = self.flavour if self.flavour != "auto" else detect(values)
        if flavour is None:
            self._warn(f"server_metrics.url={self.url}: no series of a known server (vLLM, SGLang, TGI, llama.cpp); "
                       "set server_metrics.flavour")
            return False
        self.scrapes.append((when, {ours: values[theirs] for ours, theirs in FLAVOURS[flavour].items()
                                    if theirs in values}))
        return True

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning("%s", message)

    def series(self) -> dict[str, dict[int, float]]:
        """``server/<name>`` -> {step: value}: gauges as scraped, counters per second since the scrape before."""
        out: dict[str, dict[int, float]] = {}
        for (before, old), (when, new) in zip([(0.0, {}), *self.scrapes], self.scrapes):
            step = max(0, round(when))
            for name in GAUGES:
                if name in new:
                    out.setdefault(f"{PREFIX}{name}", {})[step] = new[name]
            if not old or when <= before:
                continue
            for name in COUNTERS:
                if name in new and name in old:
                    out.setdefault(f"{PREFIX}{name}_per_s", {})[step] = (new[name] - old[name]) / (when - before)
            queried = new.get("prefix_cache_queries", 0.0) - old.get("prefix_cache_queries", 0.0)
            if queried > 0 and "prefix_cache_hits" in new:
                hits = new["prefix_cache_hits"] - old.get("prefix_cache_hits", 0.0)
                out.setdefault(f"{PREFIX}prefix_cache_hit_rate", {})[step] = hits / queried
        return out

    def totals(self) -> dict[str, float]:
        """The token counters' growth from the first scrape to the last (the measured run)."""
        if len(self.scrapes) < 2:
            return {}
        first, last = self.scrapes[0][1], self.scrapes[-1][1]
        return {f"{PREFIX}{name}_total": last[name] - first[name] for name in COUNTERS if name in first and name in last}

    def compare(self, metrics: Mapping[str, Any]) -> None:
        """One warning when the server counted other token totals than pikeclient did."""
        totals = self.totals()
        pairs = [(name, totals.get(f"{PREFIX}{name}_total"), metrics.get(ours)) for name, ours in
                 (("prompt_tokens", "tokens/prompt_total"), ("generation_tokens", "tokens/completion_total"))]
        off = [(name, theirs, ours) for name, theirs, ours in pairs if theirs is not None and ours is not None
               and abs(theirs - ours) > max(2.0, MISMATCH * max(theirs, ours))]
        if off:
            log.warning("the server counted other tokens than pikeclient during the run: %s (another client of the "
                        "same server, warm-up or cut calls, or a different count)",
                        "; ".join(f"{name} {theirs:.0f} by the server, {ours:.0f} by pikeclient"
                                  for name, theirs, ours in off))
