"""Estimated cost of a run from a price table (``conf/pricing/``), per 1M input and output tokens."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    model: str
    input_per_m: float
    output_per_m: float
    currency: str

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1_000_000


# Providers whose endpoints charge the list prices of ``pricing.models``. An OpenAI-compatible
# server elsewhere (vLLM, llama.cpp, Ollama) or a local model is not priced by model name: a server
# answering to "gpt-4o-mini" does not cost what OpenAI charges.
PRICED_PROVIDERS = ("azure_openai", "azure_meta_llama")
OPENAI_HOST = "api.openai.com"
AZURE_HOSTS = (".azure.com", ".azure.us", ".azure.cn")  # public, government and China clouds


def find_price(pricing: Mapping[str, Any], client: Mapping[str, Any]) -> Price | None:
    """The price that applies to a client's endpoint, or None.

    ``pricing.endpoints`` (a list of ``{url, input, output}``, matched by URL prefix) comes first;
    otherwise model prices apply only to the providers' own endpoints (OpenAI, Azure), an Azure
    deployment name being mapped to its model first.
    """
    currency = pricing.get("currency", "USD")
    endpoint = str(client.get("endpoint") or "").rstrip("/")
    for entry in pricing.get("endpoints") or ():
        if endpoint and endpoint.startswith(str(entry["url"]).rstrip("/")):
            return Price(str(entry["url"]), float(entry["input"]), float(entry["output"]), currency)
    if not is_provider_endpoint(client):
        log.info("%s is not a priced provider endpoint: no cost (pricing.endpoints can name a price)", endpoint
                 or client.get("provider"))
        return None
    models = pricing.get("models") or {}
    deployments = pricing.get("deployments") or {}
    candidates = [deployments.get(client.get("deployment")), client.get("deployment"), client.get("model")]
    for name in filter(None, candidates):
        entry = models.get(name)
        if entry is not None:
            return Price(name, float(entry["input"]), float(entry["output"]), currency)
    log.warning("no price for model %r in the pricing table: cost not logged", client.get("model"))
    return None


def is_provider_endpoint(client: Mapping[str, Any]) -> bool:
    """True for endpoints that charge the providers' list prices: OpenAI's own API and Azure's (an Azure
    backend pointed at another server, a loopback test server say, is not priced like Azure)."""
    host = urlsplit(str(client.get("endpoint") or "")).hostname or ""
    if client.get("provider") in PRICED_PROVIDERS:
        return host.endswith(AZURE_HOSTS)
    return client.get("provider") == "openai" and host == OPENAI_HOST


def cost_metrics(price: Price | None, prompt_tokens: int, completion_tokens: int, uncounted: int) -> dict[str, float]:
    """``Cost/<currency>`` for the counted tokens; nothing when the price or the counts are unknown."""
    if price is None:
        return {}
    if uncounted:
        log.warning("%d calls have no token counts: cost not logged", uncounted)
        return {}
    return {f"Cost/{price.currency.lower()}": price.cost(prompt_tokens, completion_tokens)}
