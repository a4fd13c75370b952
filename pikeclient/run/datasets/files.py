"""Reading the objects of a data file one at a time: JSON Lines (one object a line) or a JSON array
(ShareGPT's files), without reading the whole file into memory; and CSV rows as objects."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pikeclient.core.errors import ConfigError

CHUNK = 1 << 20  # characters read at a time from a JSON array


def open_file(path: Path, key: str = "dataset.path") -> Path:
    if not path.is_file():
        raise ConfigError(f"{key}: no such file: {path}")
    return path


def json_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each line of a JSONL file or each element of a JSON array (the first character
    that is not white space tells which); ``where`` names the file and line or element for messages."""
    with path.open("rb") as file:
        head = file.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):  # a byte-order mark
        head = head[3:].lstrip()
    if head.startswith(b"["):
        yield from _array(path)
    else:
        yield from json_lines(path)


def json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSONL file, parsed; a bad line fails with its line number."""
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            if raw.strip():
                where = f"{path}:{lineno}"
                yield where, parse_json(raw, where)


def parse_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{where}: not UTF-8 (byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from error


def _array(path: Path) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON array, each decoded as soon as it is whole (``json.JSONDecoder.raw_decode``
    on a sliding window), so that a 600 MB ShareGPT file is never held at once."""
    decoder = json.JSONDecoder()
    try:
        with path.open("r", encoding="utf-8-sig") as file:
            window = _Window(file)
            window.expect("[")
            index = 0
            while True:
                if window.peek() == "]":
                    return
                if index:
                    window.expect(",")
                where = f"{path}: element {index}"
                if window.peek() != "{":
                    raise ConfigError(f"{where}: expected a JSON object")
                yield where, window.decode(decoder, where)
                index += 1
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 (byte {error.start} of a block)") from error


class _Window:
    """The unread part of a text file, refilled as decoding needs more."""

    def __init__(self, file: IO[str]) -> None:
        self.file, self.text, self.pos = file, "", 0

    def _more(self) -> bool:
        chunk = self.file.read(CHUNK)
        if not chunk:
            return False
        self.text, self.pos = self.text[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more():
                raise ConfigError(f"{self.file.name}: the JSON array ends early (no closing ']')")

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ConfigError(f"{self.file.name}: invalid JSON: expected {char!r} (character {self.pos} of a block)")
        self.pos += 1

    def decode(self, decoder: json.JSONDecoder, where: str) -> Any:
        while True:
            try:
                value, self.pos = decoder.raw_decode(self.text, self.pos)
                return value
            except json.JSONDecodeError as error:  # cut by the window's end, or invalid: more text tells which
                if not self._more():
                    raise ConfigError(f"{where}: invalid JSON: {error.msg}") from error


def csv_rows(path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Each row of a CSV file with a header line, as ``{column: text}``."""
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 (byte {error.start} of a block)") from error
    except csv.Error as error:
        raise ConfigError(f"{path}: invalid CSV: {error}") from error
