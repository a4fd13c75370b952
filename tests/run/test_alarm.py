"""The open loop's alarm (pikeclient.run.alarm): never early, at once for a time gone by, one timerfd per
alarm, closed at the end; where no timerfd is to be had, asyncio.sleep."""

import asyncio
import os
import time

import pytest

from pikeclient.run import alarm as alarm_module
from pikeclient.run.alarm import Alarm


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("timerfd", [True, False], ids=["timerfd", "asyncio-sleep"])
def test_it_wakes_at_each_time_asked_never_before(timerfd, monkeypatch):
    if not timerfd:
        monkeypatch.setattr(alarm_module, "_libc", lambda: None)

    async def main() -> list[float]:
        early = []
        with Alarm() as alarm:
            assert (alarm.fd is not None) == (timerfd and alarm_module._libc() is not None)
            start = time.perf_counter()
            for step in range(1, 60):
                when = start + step * 0.0007
                await alarm.until(when)
                early.append(when - time.perf_counter())
            await alarm.until(time.perf_counter() - 1.0)  # gone by: at once
        return early

    assert max(asyncio.run(main())) <= 0.0


def test_a_cancelled_wait_leaves_it_usable_and_the_descriptor_is_closed():
    fds = open_fds()

    async def main() -> None:
        with Alarm() as alarm:
            waiting = asyncio.ensure_future(alarm.until(time.perf_counter() + 30.0))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            when = time.perf_counter() + 0.002
            await asyncio.wait_for(alarm.until(when), timeout=10.0)  # re-armed: the 30 s wait is gone
            assert time.perf_counter() >= when

    asyncio.run(main())
    assert open_fds() == fds
