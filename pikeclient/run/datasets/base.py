"""What every dataset reader shares: the selection options (filters by prompt length, a seeded sample, a
limit) and the pipeline that applies them to the reader's records as they stream past.

A reader yields *units*: one request, or the turns of one conversation (``conversations=true``), so that
filters, samples and limits keep conversations whole. Only the units kept are held in memory.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.run.dataset import PromptItem

Unit = list[PromptItem]


@dataclass
class DatasetReader:
    """Options every reader takes (``dataset.*``):

    - ``limit``: the first N records (requests, or conversations) only;
    - ``sample`` and ``seed``: N records drawn at random (a seeded reservoir sample, kept in file order);
    - ``min_input_tokens`` / ``max_input_tokens``: only records whose prompts are that long, as the
      client's own tokenizer counts them (chat template included; a conversation's turns each, without
      the history, whose answers only the run will know).
    """

    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None

    kind: ClassVar[str] = "dataset"  # the name MLflow's Datasets column shows when the source has none

    def __post_init__(self) -> None:
        for key in ("limit", "sample", "min_input_tokens", "max_input_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"dataset.{key}={value} is out of range: allowed >= 1")
        low, high = self.min_input_tokens, self.max_input_tokens
        if low is not None and high is not None and low > high:
            raise ConfigError(f"dataset.min_input_tokens={low} > dataset.max_input_tokens={high}: no prompt fits")

    # -- what a reader implements ------------------------------------------------------------------------------

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        """The records, one unit each, streamed; ``client`` counts tokens where the reader needs it."""
        raise NotImplementedError

    def source(self) -> str:
        """Where the prompts come from, for MLflow's Datasets column (a path, or how they were made)."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.kind

    @property
    def needs_client(self) -> bool:
        """Whether reading needs the client's token counts (the model is loaded first): length filters do."""
        return self.min_input_tokens is not None or self.max_input_tokens is not None

    # -- the pipeline ------------------------------------------------------------------------------------------

    def read(self, client: BaseLLMClient | None = None) -> list[PromptItem]:
        """Every kept item, in the source's order; a ConfigError names what is wrong before any call."""
        if self.needs_client and client is None:
            raise ConfigError(f"dataset ({self.kind}) needs the client's token counts to be read")
        units: Iterable[Unit] = self.units(client)
        filtering = self.min_input_tokens is not None or self.max_input_tokens is not None
        if filtering:
            units = filter(self._fits(client), units)
        if self.sample is not None:
            units = reservoir(units, self.sample, random.Random(self.seed))
        if self.limit is not None:
            units = itertools.islice(units, self.limit)
        items: list[PromptItem] = []
        seen: set[str] = set()
        for unit in units:
            for item in unit:
                if item.id in seen:
                    raise ConfigError(f"{self.source()}: duplicate id {item.id!r}")
                seen.add(item.id)
            items.extend(unit)
        if not items:
            passing = " that pass dataset.min_input_tokens / max_input_tokens" if filtering else ""
            raise ConfigError(f"dataset: {self.source()} holds no prompts{passing}")
        return items

    def _fits(self, client: BaseLLMClient | None) -> Callable[[Unit], bool]:
        counter = require_counts(client, "dataset.min_input_tokens / max_input_tokens")
        low, high = self.min_input_tokens or 0, self.max_input_tokens

        def fits(unit: Unit) -> bool:
            for item in unit:
                count = counter.count_message_tokens(list(item.messages)) or 0
                if count < low or (high is not None and count > high):
                    return False
            return True

        return fits


def reservoir(units: Iterable[Unit], size: int, rng: random.Random) -> list[Unit]:
    """``size`` units drawn uniformly from a stream of unknown length (Algorithm R), in stream order."""
    kept: list[tuple[int, Unit]] = []
    for position, unit in enumerate(units):
        if position < size:
            kept.append((position, unit))
        else:
            slot = rng.randrange(position + 1)
            if slot < size:
                kept[slot] = (position, unit)
    return [unit for _, unit in sorted(kept, key=lambda pair: pair[0])]


def require_counts(client: BaseLLMClient | None, what: str) -> BaseLLMClient:
    """The client, when it can count tokens (``what`` is the setting that needs them)."""
    if client is None or client.count_source == "none":
        raise ConfigError(f"{what} needs token counts: set llm.tokenizer to the model's tokenizer")
    return client
