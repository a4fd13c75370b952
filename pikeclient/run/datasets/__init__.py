"""Dataset readers, the ``dataset`` config group: one small class each, chosen by ``_target_``.

- :class:`~pikeclient.run.datasets.jsonl.JsonlDataset`: a JSONL prompt file (``prompt`` or ``messages``
  lines, or OpenAI batch-request lines) — ``dataset=prompts``, ``dataset=qa``;
- :class:`~pikeclient.run.datasets.sharegpt.ShareGPTDataset`: ShareGPT conversations — ``dataset=sharegpt``;
- :class:`~pikeclient.run.datasets.hf.HFDataset`: a Hugging Face ``datasets`` dataset — ``dataset=hf``;
- :class:`~pikeclient.run.datasets.synthetic.SyntheticDataset`: seeded prompts of known sizes —
  ``dataset=synthetic``;
- traces with send times, for ``load=replay`` (:mod:`pikeclient.run.datasets.traces`).

Each takes the selection options of :class:`~pikeclient.run.datasets.base.DatasetReader` (filters by
prompt length, a seeded sample, a limit). A reader of your own is one class and one YAML file naming it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from pikeclient.config.factory import check_target_args
from pikeclient.core.errors import ConfigError
from pikeclient.run.datasets.base import DatasetReader

log = logging.getLogger(__name__)

__all__ = ["DatasetReader", "build_dataset"]


def build_dataset(spec: Mapping[str, Any], group: str = "dataset") -> DatasetReader:
    """The reader ``spec`` names (``_target_`` and its options), its options checked; one line per problem."""
    if not isinstance(spec, Mapping) or not spec.get("_target_"):
        raise ConfigError(f"{group} must name a reader with _target_ (choose a file in conf/{group}/)")
    builder = check_target_args(group, spec)
    if not (inspect.isclass(builder) and issubclass(builder, DatasetReader)):
        raise ConfigError(f"{group}._target_={spec['_target_']} is not a dataset reader (pikeclient.run.datasets)")
    log.info("Instantiating dataset <%s>", spec["_target_"])
    return builder(**{k: v for k, v in spec.items() if not k.startswith("_")})
