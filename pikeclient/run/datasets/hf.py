"""``dataset=hf``: a Hugging Face ``datasets`` dataset (``pip install -e ".[hf]"``), streamed row by row.

``path`` is a local file (JSON, JSONL, CSV, Parquet, Arrow), a folder of such files, a folder written by
``Dataset.save_to_disk``, or a hub name (``path=tatsu-lab/alpaca``, with ``subset`` and ``split``) where the
hub is reachable. Columns are mapped by name: ``prompt_column`` (a string) or ``messages_column`` (chat
messages), ``output_tokens_column`` (what each row asks for), ``id_column`` (else the row's number).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError, one_line
from pikeclient.core.types import user_message
from pikeclient.run.dataset import PromptItem, check_messages, check_text, is_blank
from pikeclient.run.datasets.base import Unit
from pikeclient.run.datasets.chat import ChatReader, turns

# The ``datasets`` builder that reads each kind of local file.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class HFDataset(ChatReader):
    split: str = "train"
    subset: str | None = None  # a hub dataset's configuration name
    prompt_column: str = "prompt"
    messages_column: str | None = None
    output_tokens_column: str | None = None
    id_column: str | None = None
    kind = "hf"
    NO_PATH = "name a data file, a saved dataset folder or a hub dataset"

    def source(self) -> str:
        local = Path(str(self.path)).expanduser()
        return str(local.resolve()) if local.exists() else f"hf://{self.path}"

    def units(self, client: BaseLLMClient | None) -> Iterator[Unit]:
        rows = self._rows()
        for number, row in enumerate(rows):
            where = f"{self.path}: row {number}"
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: not a row of named columns")
            item_id = str(row[self.id_column]) if self.id_column else str(number)
            check_text(item_id, where)
            item = PromptItem(item_id, self._messages(row, where), max_tokens=self._output_tokens(row, where))
            if self.conversations:
                yield turns(item_id, item.messages, fixed=item.max_tokens)
            else:
                yield [item]

    def _rows(self) -> Iterable[dict[str, Any]]:
        try:
            import datasets
        except ImportError:
            raise ConfigError('dataset=hf needs the datasets package: pip install -e ".[hf]"') from None
        datasets.disable_progress_bars()
        local = Path(str(self.path)).expanduser()
        try:
            if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(local))  # memory-mapped Arrow: rows are read as iterated
                rows = loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
            elif local.is_file():
                builder = BUILDERS.get(local.suffix.lower())
                if builder is None:
                    raise ConfigError(f"dataset.path={self.path!r}: allowed files end in {', '.join(BUILDERS)}")
                rows = datasets.load_dataset(builder, data_files=str(local), split=self.split, streaming=True)
            else:  # a folder of data files, or a hub name: streamed, nothing converted or cached first
                rows = datasets.load_dataset(str(local) if local.is_dir() else str(self.path), self.subset,
                                             split=self.split, streaming=True)
            self._check_columns(getattr(rows, "column_names", None))
            yield from rows
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; each is one line for the user
            raise ConfigError(f"dataset.path={self.path!r}: datasets cannot read it ({one_line(error)})") from None

    def _check_columns(self, columns: list[str] | None) -> None:
        if not columns:
            return  # a streamed hub dataset may not know its columns before its first row
        wanted = {"messages_column": self.messages_column} if self.messages_column else {
            "prompt_column": self.prompt_column}
        wanted.update(output_tokens_column=self.output_tokens_column, id_column=self.id_column)
        for key, column in wanted.items():
            if column is not None and column not in columns:
                raise ConfigError(f"dataset.{key}={column!r}: no such column in {self.path} (columns: "
                                  f"{', '.join(columns)})")

    def _messages(self, row: dict[str, Any], where: str) -> tuple:
        if self.messages_column:
            return check_messages(row.get(self.messages_column), where)
        prompt = row.get(self.prompt_column)
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}: dataset.prompt_column={self.prompt_column!r} holds no string")
        check_text(prompt, where)
        if is_blank(prompt):
            raise ConfigError(f"{where}: empty prompt")
        return tuple(user_message(prompt))

    def _output_tokens(self, row: dict[str, Any], where: str) -> int | None:
        if not self.output_tokens_column:
            return None
        value = row.get(self.output_tokens_column)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: dataset.output_tokens_column={self.output_tokens_column!r} holds {value!r}, "
                              "not a token count >= 1")
        return value
