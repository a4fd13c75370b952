"""A folder owned by one live process: a job folder while its calls are made, a sweep folder while its
jobs run.

Two processes writing one job's records (a run still going and a ``resume`` started beside it) called
every prompt twice; two sweeps sharing ``hydra.sweep.dir`` interleaved their files. The owner holds an
``flock`` on a file in the folder for as long as it lives (the kernel releases it when the process ends,
even by SIGKILL), and writes its process id and host there so that the one refused can say who owns it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from pikeclient.core.errors import ConfigError

LOCK_FILE = ".pikeclient.lock"


class FolderLock:
    """``acquire`` or ConfigError("<what> <folder> is still running in process N on host H")."""

    def __init__(self, folder: str | os.PathLike[str], what: str = "job folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._file: IO[str] | None = None

    def acquire(self) -> FolderLock:
        if self._file is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        file = (self.folder / LOCK_FILE).open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(file)
            file.close()
            raise ConfigError(f"{self.what} {self.folder} is still running in process {owner.get('pid', '?')} on "
                              f"host {owner.get('host', '?')}: wait for it to end, or use another folder") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(file: IO[str]) -> dict[str, str]:
    try:
        file.seek(0)
        return json.loads(file.read() or "{}")
    except (OSError, ValueError):
        return {}
