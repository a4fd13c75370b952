"""``dataset=synthetic``: seeded prompts of known token sizes, measured with the client's own tokenizer
(:mod:`pikeclient.run.synthetic`), optionally sharing ``prefix_groups`` system prompts of ``prefix_tokens``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pikeclient.config.checks import check_finite
from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.run.datasets.base import DatasetReader, Unit
from pikeclient.run.synthetic import synthetic_prompts


@dataclass
class SyntheticDataset(DatasetReader):
    count: int = 100
    input_tokens: int = 256
    input_tokens_std: float = 0.0
    output_tokens: int = 128
    output_tokens_std: float = 0.0
    prefix_tokens: int = 0
    prefix_groups: int = 1
    kind = "synthetic"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("input_tokens_std", "output_tokens_std"):
            check_finite(f"dataset.{name}", getattr(self, name))

    @property
    def needs_client(self) -> bool:
        return True  # sized with the client's own tokenizer

    def source(self) -> str:
        prefix = f", prefix_tokens={self.prefix_tokens} x {self.prefix_groups}" if self.prefix_tokens else ""
        return f"synthetic(count={self.count}, input_tokens={self.input_tokens}, seed={self.seed}{prefix})"

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        if client is None:
            raise ConfigError("dataset=synthetic needs the client's tokenizer")
        items = synthetic_prompts(client, self.count, self.input_tokens, self.output_tokens, self.input_tokens_std,
                                  self.output_tokens_std, self.seed, self.prefix_tokens, self.prefix_groups)
        return ([item] for item in items)
