"""Workers on a Ray cluster (``load.backend=ray``): the same workers as ``load.workers`` processes
(:mod:`pikeclient.run.worker`), as Ray actors, one CPU each, placed by the cluster.

The run's process listens on a TCP port of its node's address; each actor connects back, says the run's
one-time token, and then speaks the workers' frames, so the schedule, the records and the statistics stay
in the run's process exactly as with local workers. The cluster is the one ``load.ray_address`` names,
else ``RAY_ADDRESS``, else the one this process is already part of (a job launched by Hydra's Ray
launcher), else a running local one (``ray start --head``). The nodes need pikeclient installed (the
same version), as they do for the Ray launcher's jobs.

Clocks: a request's due time travels as seconds after the run's start, which each worker places on its
own clock from the start's epoch time; across machines, dispatch delays are as exact as the nodes'
clock synchronisation (NTP: about a millisecond).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any

from pikeclient.run.wire import receive, send
from pikeclient.run.workers import WorkerFailed, WorkerPlan

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 120.0  # actors are scheduled, started (a Python process each) and connected by then


class RayWorker:
    """The Ray actor: connects to the run and serves it as one worker."""

    def serve(self, host: str, port: int, token: str) -> bool:
        from pikeclient.run.worker import Worker

        async def main() -> None:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                await send(writer, ("hello", token))
                await Worker(reader, writer).serve()
            finally:
                writer.close()

        asyncio.run(main())
        return True


def check_reachable(address: str) -> None:
    """A cluster given as host:port answers on that port (Ray itself would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", or a Ray client address: Ray says what is wrong
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise WorkerFailed(f"load.backend=ray: no Ray cluster at {address}: {error}") from None


async def connect_ray_workers(plan: WorkerPlan, count: int) -> tuple[list[tuple[Any, Any, Any]], Callable[[], None]]:
    """``count`` actors connected to this process: their (reader, writer, actor), and what ends them."""
    try:
        import ray
    except ImportError:
        raise WorkerFailed("load.backend=ray needs Ray: pip install -e '.[team]'") from None
    if not ray.is_initialized():
        address = plan.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise WorkerFailed(f"load.backend=ray: no Ray cluster at {address}: {error}") from None
    host = ray.util.get_node_ip_address()
    token = secrets.token_hex(16)
    arrived: asyncio.Queue = asyncio.Queue()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await receive(reader) == ("hello", token):
            arrived.put_nowait((reader, writer))
        else:  # not one of this run's actors
            writer.close()

    server = await asyncio.start_server(connected, host=host, port=0)
    port = server.sockets[0].getsockname()[1]
    actor_class = ray.remote(num_cpus=1)(RayWorker)
    actors = [actor_class.remote() for _ in range(count)]
    served = [actor.serve.remote(host, port, token) for actor in actors]

    def end() -> None:
        try:
            ray.get(served, timeout=30)
        except Exception as error:  # noqa: BLE001 - the run's records are already in; say what happened
            log.warning("a Ray worker ended with an error: %s", str(error).splitlines()[0])
        for actor in actors:
            ray.kill(actor)

    connections = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_TIMEOUT_S
        while len(connections) < count:
            finished, _ = ray.wait(served, num_returns=1, timeout=0)
            if finished:  # an actor ended before connecting: its error says why
                ray.get(finished)
                raise WorkerFailed("a Ray worker ended before connecting")
            try:
                reader, writer = await asyncio.wait_for(arrived.get(), timeout=1.0)
            except TimeoutError:
                if loop.time() > deadline:
                    raise WorkerFailed(f"load.backend=ray: {count - len(connections)} of {count} workers did not start "
                                       f"within {CONNECT_TIMEOUT_S:.0f} s (each needs a free CPU in the cluster)") from None
                continue
            connections.append((reader, writer, None))
    except BaseException as error:
        for actor in actors:
            ray.kill(actor)
        if isinstance(error, ray.exceptions.RayError):
            raise WorkerFailed(f"a Ray worker failed to start: {str(error).splitlines()[0]}") from None
        raise
    finally:
        server.close()
    return connections, end
