"""One job per output folder: an exclusive lock that names the process holding it.

Two commands writing into one folder (a second terminal, a re-launched job while the first still runs) would both
draw everything and leave each other's half-written files behind. Every long job (build-data, train, merge,
evaluate, align) therefore holds `OUTPUT_DIR/.safety_dpo.lock` while it runs:

```python
with FolderLock(output_dir, "safety-dpo build-data"):
    ...
```

The lock is an `fcntl.flock` on that file, so the operating system releases it when the process ends, however it
ends (a SIGKILL leaves the file but no lock on it). The file is removed when the job lets go, and so is the folder
when the job created it and wrote nothing else (a refused input leaves nothing behind). The holder writes its pid, host, command and start time into the file; a
second process is refused with a `FolderInUseError` naming them. A process that already holds the lock may take it
again (nested jobs: `align` runs `evaluate` in its own folder). Where `fcntl` does not exist (Windows) the lock is
not taken and a warning says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = ".safety_dpo.lock"

_held: dict[Path, int] = {}  # folder -> depth, for the locks this process holds
_handles: dict[Path, Any] = {}


def folder_contents(path: str | os.PathLike) -> list[str]:
    """The names in folder `path` other than the lock file (sorted; [] for a folder that does not exist), for the
    jobs that must tell an empty folder, which the lock alone does not fill, from one holding other files."""
    path = Path(path)
    return sorted(entry.name for entry in path.iterdir() if entry.name != LOCK_FILE) if path.is_dir() else []


class FolderInUseError(RuntimeError):
    """Another process is writing into the output folder."""


class FolderLock:
    """Hold the output folder `path` for one job (a context manager; the folder is created if needed).

    Args:
        path: The output folder.
        job: What the job is, for the other process's error message (e.g. "safety-dpo evaluate").

    Raises:
        FolderInUseError: On entering, if another process holds the folder; the message names its pid, host,
            command and start time.
    """

    def __init__(self, path: str | os.PathLike, job: str) -> None:
        self.path = Path(path).expanduser().resolve()
        self.job = job

    def __enter__(self) -> FolderLock:
        if self.path in _held:
            _held[self.path] += 1
            return self
        if fcntl is None:
            logger.warning("No lock on %s: fcntl is not available on this platform.", self.path)
            _held[self.path] = 1
            return self
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = self._acquire()
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "job": self.job,
                    "command": " ".join(sys.argv),
                    "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
            )
        )
        handle.flush()
        _held[self.path], _handles[self.path] = 1, handle
        return self

    def _acquire(self) -> Any:
        lock_file = self.path / LOCK_FILE
        while True:
            handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 - held open while locked
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _describe(handle.read())
                handle.close()
                raise FolderInUseError(
                    f"{str(self.path)!r} is in use by another process ({holder}). Wait for it to finish, stop it, or "
                    "choose another output folder."
                ) from None
            # The holder removes the file when it lets go: a lock won on a file that was removed meanwhile guards
            # nothing, so take the one now at that path.
            try:
                if os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    def __exit__(self, *exc_info: Any) -> None:
        _held[self.path] -= 1
        if _held[self.path]:
            return
        del _held[self.path]
        handle = _handles.pop(self.path, None)
        if handle is None:
            return
        # Remove the file while still holding the lock (a process killed first leaves it, unlocked and harmless),
        # and the folder too if this job created it and wrote nothing else (e.g. its input was refused).
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
        if self.created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only succeeds when empty


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (
            f"pid {holder['pid']} on {holder['host']}, {holder['job']} started {holder['since']}: "
            f"`{holder['command']}`"
        )
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"
