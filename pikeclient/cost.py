"""Estimated cost of a run from a price table (``conf/pricing/``), per 1M input and output tokens."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    model: str
    input_per_m: float
    output_per_m: float
    currency: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1_000_000


def find_price(pricing: Mapping[str, Any], client: Mapping[str, Any]) -> Price | None:
    """The price for a client's model; an Azure deployment name is mapped to its model first."""
    models = pricing.get("models") or {}
    deployments = pricing.get("deployments") or {}
    candidates = [deployments.get(client.get("deployment")), client.get("deployment"), client.get("model")]
    for name in filter(None, candidates):
        entry = models.get(name)
        if entry is not None:
            return Price(name, float(entry["input"]), float(entry["output"]), pricing.get("currency", "USD"))
    log.warning("no price for model %r in the pricing table: cost not logged", client.get("model"))
    return None


def cost_metrics(price: Price | None, prompt_tokens: int, completion_tokens: int, uncounted: int) -> dict[str, float]:
    """``cost_<currency>`` for the counted tokens; nothing when the price or the counts are unknown."""
    if price is None:
        return {}
    if uncounted:
        log.warning("%d calls have no token counts: cost not logged", uncounted)
        return {}
    return {f"cost_{price.currency.lower()}": price.cost(prompt_tokens, completion_tokens)}
