"""Playing conversations (``load=sessions``): each simulated user sends a conversation's turns in order,
turn k with the real answers to turns 1..k-1 before it, waiting its think time between an answer and the
next turn. The calls themselves are the runner's (``_Calls.one``): timing, records, cache and limits are
the same as for single prompts.

A conversation is a run of consecutive dataset items with the same ``session`` (a prompt without one is a
conversation of one turn). Records carry ``session_id``, ``turn`` and ``turns`` (the conversation's
length). A turn that fails ends its session: the turns after it are not sent (no answer to build on),
and a resumed run plays them, from the first unanswered turn, with the earlier answers as history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pikeclient.core.types import Message
from pikeclient.run.dataset import PromptItem
from pikeclient.run.shapes.sessions import Sessions

if TYPE_CHECKING:
    from pikeclient.run.runner import _Calls


@dataclass
class Conversation:
    key: str
    turns: list[tuple[int, PromptItem]] = field(default_factory=list)  # (index in the run, item)


def conversations(prompts: Sequence[PromptItem]) -> Iterator[Conversation]:
    """The run's conversations in order, made as they are needed (a repeat of one is another conversation)."""
    current: Conversation | None = None
    for index, item in enumerate(prompts):
        name = item.session if item.session is not None else item.id
        key = name if not item.repeat else f"{name}/{item.repeat}"
        if current is None or current.key != key:
            if current is not None:
                yield current
            current = Conversation(key)
        current.turns.append((index, item))
    if current is not None:
        yield current


async def play_sessions(calls: _Calls, prompts: Sequence[PromptItem], done: Mapping[int, dict[str, Any]],
                        strategy: Sessions, start: float) -> None:
    """Play every conversation of ``prompts`` not answered in ``done`` (a resumed run's earlier answers)."""
    player = _Player(calls, done, strategy, start)
    todo = (c for c in conversations(prompts) if not all(index in done for index, _ in c.turns))
    if strategy.rate is None:
        async def user() -> None:
            for conversation in todo:  # one shared iterator: each user takes the next conversation
                if not calls.allowed(start):
                    return
                await player.play(conversation)

        await asyncio.gather(*(calls.track(user()) for _ in range(strategy.max_in_flight)))
        return
    slots = asyncio.Semaphore(strategy.max_in_flight)

    async def session(conversation: Conversation) -> None:
        try:
            await player.play(conversation)
        finally:
            slots.release()

    for conversation, offset in zip(todo, strategy.arrivals()):
        wait = start + offset - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if not calls.allowed(start):
            break
        await slots.acquire()
        calls.track(session(conversation))
    if calls.tasks:
        await asyncio.gather(*calls.tasks)


class _Player:
    def __init__(self, calls: _Calls, done: Mapping[int, dict[str, Any]], strategy: Sessions, start: float) -> None:
        self.calls, self.done, self.strategy, self.start = calls, done, strategy, start

    async def play(self, conversation: Conversation) -> None:
        """The conversation's unanswered turns, in order, each after the history so far."""
        history: list[Message] = []
        think = self.strategy.think_times(conversation.key)
        sent = False
        for position, (index, item) in enumerate(conversation.turns):
            record = self.done.get(index)
            if record is None:
                pause = next(think) if sent else 0.0
                if pause > 0:
                    await asyncio.sleep(pause)
                if not self.calls.allowed(self.start):
                    return
                record = await self.calls.one(index, item, history=tuple(history), extra={
                    "session_id": conversation.key, "turn": item.turn or position + 1,
                    "turns": len(conversation.turns)})
                sent = True
                if record["error"] is not None:
                    self.calls.stats.turns.not_sent += len(conversation.turns) - position - 1
                    return
            history += [*item.messages, {"role": "assistant", "content": record["response"]}]
