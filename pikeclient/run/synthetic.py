"""Synthetic prompts (``dataset=synthetic``): a seeded prompt set of known sizes, as load tools make them.

Input sizes are measured with the client's own token counter (the model's tokenizer where known, so
``input_tokens`` is what the model sees, chat template included); each prompt also carries the output
length it asks for, sent as its ``max_tokens``. Records say requested and actual output tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from pikeclient.core.client import BaseLLMClient
from pikeclient.core.errors import ConfigError
from pikeclient.core.types import Message, user_message
from pikeclient.run.dataset import PromptItem

log = logging.getLogger(__name__)

# Common English words: text any tokenizer splits into ordinary tokens (no rare symbols).
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask seem feel try leave call good new first last long great little own other "
         "old right big high different small large next early young important few public bad same able to of in "
         "for on with at by from up about into over after river mountain city table window garden music story "
         "light water paper voice market answer question reason moment history system program morning evening").split()


def synthetic_prompts(client: BaseLLMClient, count: int, input_tokens: int, output_tokens: int,
                      input_std: float = 0.0, output_std: float = 0.0, seed: int = 0, prefix_tokens: int = 0,
                      prefix_groups: int = 1) -> list[PromptItem]:
    """``count`` prompts of about ``input_tokens`` tokens (normal, ``input_std``), each asking for about
    ``output_tokens`` (normal, ``output_std``); the same seed gives the same prompts.

    ``prefix_tokens``: each prompt starts with one of ``prefix_groups`` system prompts of exactly that many
    tokens (prompt i has prefix i mod groups), the shared prefix an agent's long system prompt gives
    a server's prefix cache; ``input_tokens`` is the whole prompt's size, prefix included."""
    for name, value in (("count", count), ("input_tokens", input_tokens), ("output_tokens", output_tokens),
                        ("prefix_groups", prefix_groups)):
        if value < 1:
            raise ConfigError(f"dataset.{name}={value} is out of range: allowed >= 1")
    if input_std < 0 or output_std < 0:
        raise ConfigError("dataset.input_tokens_std and dataset.output_tokens_std must be >= 0")
    if prefix_tokens < 0 or (prefix_tokens and prefix_tokens >= input_tokens):
        raise ConfigError(f"dataset.prefix_tokens={prefix_tokens} is out of range: allowed 0 (none) to less than "
                          f"dataset.input_tokens={input_tokens} (the whole prompt's size, prefix included)")
    if client.count_source == "none":
        raise ConfigError("dataset=synthetic needs token counts: set llm.tokenizer to the model's tokenizer")
    if client.count_source == "estimate":
        log.warning("synthetic prompt sizes are estimates: %s counts with an encoding made for another model "
                    "(set llm.tokenizer for exact sizes)", client.model)
    rng = random.Random(seed)
    drawn_sizes = []
    for _ in range(count):  # every size first: one that no model could take fails before any text is made
        target = max(1, round(rng.gauss(input_tokens, input_std))) if input_std else input_tokens
        wanted = max(1, round(rng.gauss(output_tokens, output_std))) if output_std else output_tokens
        window = client.context_window
        if window and target + wanted > window:
            drawn = "" if (target, wanted) == (input_tokens, output_tokens) else f" (drawn: {target} + {wanted})"
            raise ConfigError(f"dataset.input_tokens={input_tokens} + output_tokens={output_tokens}{drawn} exceeds "
                              f"the {window}-token context window of {client.model}")
        drawn_sizes.append((target, wanted))
    costs = word_costs(client)
    prefixes = [({"role": "system", "content": exact_text(client, prefix_tokens, random.Random(f"{seed}:prefix:{g}"),
                                                           costs)},) if prefix_tokens else ()
                for g in range(prefix_groups if prefix_tokens else 1)]
    items = []
    for index, (target, wanted) in enumerate(drawn_sizes):
        head = prefixes[index % len(prefixes)]
        text = text_of(client, target, rng, f"{index}: ", costs, head)
        items.append(PromptItem(f"synthetic-{index}", (*head, *user_message(text)), max_tokens=wanted))
    return items


def word_costs(client: BaseLLMClient) -> dict[str, int]:
    """Tokens each word adds after a space: enough to place a prompt's length within a few words."""
    return {word: max(1, client.get_token_count(" " + word) or 1) for word in WORDS}


def text_of(client: BaseLLMClient, target: int, rng: random.Random, prefix: str, costs: dict[str, int],
            head: Sequence[Message] = ()) -> str:
    """The shortest run of words whose prompt (as the model sees it) has at least ``target`` tokens.

    The words' own token counts put the length within a few words of the target (a prompt of millions of
    tokens is not counted a dozen times over); whole-prompt counts, chat template included, then move
    it word by word. A unique prefix keeps prompts distinct, so no server-side prefix cache answers one
    from another; ``head`` (a shared system prompt) comes before the user message and counts too.
    """
    words: list[str] = []
    base = client.count_message_tokens([*head, *user_message(prefix)]) or 0
    estimate = base
    while estimate < target:
        words.append(rng.choice(WORDS))
        estimate += costs[words[-1]]

    def tokens(n: int) -> int:
        return client.count_message_tokens([*head, *user_message(prefix + " ".join(words[:n]))]) or 0

    n = len(words)
    for _ in range(8):  # the estimate's error (merges across words), corrected in proportion
        miss = target - tokens(n)
        if abs(miss) <= 2:
            break
        while miss > 0:
            if n == len(words):
                words.append(rng.choice(WORDS))
            miss -= costs[words[n]]
            n += 1
        while miss < -2 and n > 1:
            n -= 1
            miss += costs[words[n]]
    while tokens(n) < target:  # then word by word: the shortest prompt that reaches the target
        if n == len(words):
            words.append(rng.choice(WORDS))
        n += 1
    while n > 1 and tokens(n - 1) >= target:
        n -= 1
    return prefix + " ".join(words[:n])


def exact_text(client: BaseLLMClient, tokens: int, rng: random.Random, costs: dict[str, int]) -> str:
    """Words of exactly ``tokens`` tokens as the client counts a text (no chat template): a shared prefix or
    a trace's block that is exactly the size asked for. Words the tokenizer reads as one token each are
    used, so a word more or less moves the count by one."""
    single = [word for word in WORDS if costs[word] == 1] or list(WORDS)
    words = [rng.choice(single) for _ in range(tokens)]
    for _ in range(64):
        miss = tokens - (client.get_token_count(" ".join(words)) or 0)
        if miss == 0:
            return " ".join(words)
        if miss > 0:
            words += [rng.choice(single) for _ in range(miss)]
        else:
            del words[max(1, len(words) + miss):]
            if len(words) == 1:
                break
    raise ConfigError(f"cannot make a text of exactly {tokens} tokens with {client.model}'s tokenizer")


def sizes(items: Sequence[PromptItem], client: BaseLLMClient) -> list[int]:
    """Prompt tokens of each item, as the client counts them."""
    return [client.count_message_tokens(list(item.messages)) or 0 for item in items]
