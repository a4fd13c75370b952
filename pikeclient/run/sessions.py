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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pikeclient.core.types import Message
from pikeclient.run.alarm import Alarm
from pikeclient.run.dataset import PromptItem
from pikeclient.run.shapes.sessions import Sessions

if TYPE_CHECKING:
    from pikeclient.run.runner import _Calls


@dataclass
class Conversation:
    key: str
    turns: list[tuple[int, PromptItem]] = field(default_factory=list)  # (index in the run, item)
    most: int | None = None  # at most this many of its unanswered turns are sent (a limit on requests)


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
    from pikeclient.run.runner import scheduled  # the runner imports this module

    player = Player(calls, done, strategy, start)
    todo = (c for c in conversations(prompts) if not all(index in done for index, _ in c.turns))
    if strategy.rate is None:
        async def take() -> Conversation | None:
            return next(todo, None)  # one shared iterator: each user takes the next conversation

        await play_users(calls, player, take, strategy.max_in_flight, start)
    else:
        await play_arrivals(calls, player, scheduled(zip(todo, strategy.arrivals())), strategy.max_in_flight, start)


async def play_users(calls: _Calls, player: Player, take: Callable[[], Awaitable[Conversation | None]], users: int,
                     start: float) -> None:
    """``users`` users, each playing the conversation ``take`` gives it, then the next, to the end."""
    async def user() -> None:
        while (conversation := await take()) is not None:
            if not calls.allowed(start):
                return
            await player.play(conversation)

    await asyncio.gather(*(calls.track(user()) for _ in range(users)))


async def play_arrivals(calls: _Calls, player: Player, schedule: AsyncIterator[tuple[Conversation, float]],
                        most: int, start: float) -> None:
    """Each conversation of ``schedule`` begun at its time (seconds after ``start``), ``most`` at once at most."""
    slots = asyncio.Semaphore(most)

    async def session(conversation: Conversation) -> None:
        try:
            await player.play(conversation)
        finally:
            slots.release()

    with Alarm() as alarm:
        async for conversation, offset in schedule:
            await alarm.until(start + offset)
            if not calls.allowed(start):
                break
            await slots.acquire()
            calls.track(session(conversation))
    if calls.tasks:
        await asyncio.gather(*calls.tasks)


class Player:
    """Plays conversations turn by turn through ``calls``; ``on_end`` hears of each one played."""

    def __init__(self, calls: _Calls, done: Mapping[int, dict[str, Any]], strategy: Sessions, start: float,
                 on_end: Callable[[Conversation], None] | None = None) -> None:
        self.calls, self.done, self.strategy, self.start, self.on_end = calls, done, strategy, start, on_end

    async def play(self, conversation: Conversation) -> None:
        try:
            await self._play(conversation)
        finally:
            if self.on_end is not None:
                self.on_end(conversation)

    async def _play(self, conversation: Conversation) -> None:
        """The conversation's unanswered turns, in order, each after the history so far."""
        history: list[Message] = []
        think = self.strategy.think_times(conversation.key)
        sent = False
        left = conversation.most
        for position, (index, item) in enumerate(conversation.turns):
            record = self.done.get(index)
            if record is None:
                if left == 0:  # the run's limit on requests leaves this conversation no more turns
                    return
                pause = next(think) if sent else 0.0
                if pause > 0:
                    await asyncio.sleep(pause)
                if not self.calls.allowed(self.start):
                    return
                if left is not None:
                    left -= 1
                record = await self.calls.one(index, item, history=tuple(history), extra={
                    "session_id": conversation.key, "turn": item.turn or position + 1,
                    "turns": len(conversation.turns)})
                sent = True
                if record["error"] is not None:
                    self.calls.stats.turns.not_sent += len(conversation.turns) - position - 1
                    return
            history += [*item.messages, {"role": "assistant", "content": record["response"]}]
