"""What differs between OpenAI-compatible servers: parameter names, and how each one says "I stopped".

Servers share the chat completions route but not every name in the request body: vLLM reads
``repetition_penalty`` and ``top_k``, llama.cpp's server reads ``repeat_penalty`` (and silently
ignores ``repetition_penalty``) and ignores ``max_completion_tokens``; it also applies its own
``repeat_penalty`` 1.1, ``top_k`` 40 and ``min_p`` 0.05 unless told otherwise, so that greedy decoding
there is not the model's greedy answer. ``llm.flavour`` picks the names and sends neutral values for
such defaults; ``llm.extra_body`` adds any other server-specific parameter as is (and wins over a
neutral value), never one of the fields pikeclient sets (``SET_BY_PIKECLIENT``).

Servers also end streams in their own ways: llama.cpp's server (``interrupt_requests``, on by
default) ends a running stream with ``[DONE]`` and no finish reason when another request waits, and
answers a prompt that overflows its context window with HTTP 200 and an empty event stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pikeclient.core.errors import ConfigError, ContextWindowError, InterruptedStreamError, LLMError, ProtocolError
from pikeclient.core.types import SamplingParams

INTERRUPT_HINT = ("llama.cpp's server does this to a running stream when another request waits: "
                  "start it with --interrupt_requests False")


@dataclass(frozen=True)
class Flavour:
    """How one kind of server names the sampling parameters the OpenAI API lacks."""

    name: str
    # pikeclient's name -> the server's; parameters the server does not know are left out (None).
    extras: Mapping[str, str | None] = field(default_factory=dict)
    # The field the server reads max_tokens from, when it reads only one; None: llm.max_tokens_field.
    max_tokens_field: str | None = None
    # Sent unless the request sets them: they switch off what the server would do uninvited.
    neutral: Mapping[str, Any] = field(default_factory=dict)


FLAVOURS: Mapping[str, Flavour] = MappingProxyType({
    # api.openai.com ignores unknown body fields; vLLM and SGLang read these names.
    # api.openai.com rejects min_tokens (400), so it is never sent there.
    "openai": Flavour("openai", {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_tokens": None}),
    "vllm": Flavour("vllm", {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens"}),
    "llamacpp": Flavour("llamacpp",
                        {"top_k": "top_k", "repetition_penalty": "repeat_penalty", "min_tokens": "min_tokens"},
                        max_tokens_field="max_tokens", neutral={"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}),
    # Ollama's OpenAI route reads none of them (its native API does, under options).
    "ollama": Flavour("ollama", {"top_k": None, "repetition_penalty": None, "min_tokens": None}),
})


# Body fields pikeclient sets itself, and the setting that sets each. ``llm.extra_body`` may not
# override them: records and MLflow would describe a request that was never sent, and the settings'
# range checks would be bypassed (``{temperature: 7}``).
SET_BY_PIKECLIENT: Mapping[str, str] = MappingProxyType({
    "model": "llm.model",
    "messages": "the dataset (dataset.path, or dataset=synthetic)",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "max_tokens": "sampling.max_tokens",
    "max_completion_tokens": "sampling.max_tokens (llm.max_tokens_field names the field)",
    "stop": "sampling.stop",
    "seed": "sampling.seed",
    "top_k": "sampling.top_k",
    "repetition_penalty": "sampling.repetition_penalty",
    "repeat_penalty": "sampling.repetition_penalty (sent as repeat_penalty with llm.flavour=llamacpp)",
    "min_tokens": "sampling.min_tokens (sent where llm.flavour reads it: vllm, llamacpp)",
    "stream": "llm.stream",
    "stream_options": "llm.stream (a stream is asked for its usage)",
    "n": "experiment.repeats (one answer is read per call)",
})


def check_extra_body(extra_body: Mapping[str, Any]) -> None:
    """Refuse ``llm.extra_body`` keys that would override a field pikeclient sets, naming the setting."""
    for key in extra_body:
        if key in SET_BY_PIKECLIENT:
            raise ConfigError(f"llm.extra_body.{key}: pikeclient sets this field itself; use "
                              f"{SET_BY_PIKECLIENT[key]} instead")


def flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise ConfigError(f"llm.flavour={name!r}: allowed {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


def sampling_extras(flavour: Flavour, params: SamplingParams, extra_body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's ``extra_body``: the non-OpenAI sampling parameters under the server's names,
    then ``llm.extra_body`` (checked by :func:`check_extra_body`: it only adds, or replaces a neutral value)."""
    body: dict[str, Any] = dict(flavour.neutral)
    for common, value in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty),
                          ("min_tokens", params.min_tokens)):
        name = flavour.extras.get(common, common)
        if value is not None and name is not None:
            body[name] = value
    return {**body, **extra_body}


def stream_ended_early(chunks: int, chars: int, content_type: str = "text/event-stream") -> LLMError:
    """The error for a stream the server ended cleanly before any finish reason."""
    if chunks == 0 and "text/event-stream" not in content_type:
        return ProtocolError(f"the server answered HTTP 200 with {content_type or 'no content type'} where an "
                             "event stream was expected")
    if chunks == 0:
        # Nothing at all, yet HTTP 200: what llama.cpp's server sends when the prompt cannot fit.
        return ContextWindowError("the server answered HTTP 200 with an empty event stream (llama.cpp's server "
                                  "does this when prompt + max_tokens exceed its context window, --n_ctx)")
    return InterruptedStreamError(f"the server ended the stream after {chunks} chunks ({chars} characters) "
                                  f"without a finish reason: the answer was cut; {INTERRUPT_HINT}")
