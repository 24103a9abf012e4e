"""The local spool: encoded events kept on disk while Redis cannot take them.

An append-only set of segment files in one directory, one set per process (files are
named by pid, and a process holds an ``flock`` on ``<pid>.lock`` for its lifetime, so
workers on one node never share a file). Each record is one encoded event and a
newline (orjson never writes a raw newline). ``append`` writes a whole batch and
``fsync``s once, so a machine crash loses at most that last batch; a SIGKILL of the
process loses nothing that ``append`` returned for, since the page cache survives it.
A torn last line (a crash mid-write) is skipped on replay.

Reading is oldest first: segments are sealed before they are read, and adopted sets of
dead processes (their lock free) count as older than anything of ours. The total size
is bounded; ``append`` takes only what fits. Holds encoded events only, and events
never carry content. Blocking file I/O: the emitter calls it from a worker thread.
Must not import the request handlers, auth or the upstream client.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("qnp.proxy.spool")

SEGMENT_BYTES = 4 * 1024 * 1024
_SUFFIX = ".spool"


@dataclass(slots=True)
class _Segment:
    path: Path
    size: int
    sealed: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    """Records read from the oldest segment; hand it back to ``consume`` once sent."""

    segment: Path
    records: list[bytes]
    end: int  # the record index after the last one in ``records``


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self._dir = directory
        self._max = max_bytes
        self._segment_bytes = segment_bytes
        self._pid = os.getpid()
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self._file: int | None = None  # fd of the newest, unsealed segment
        self._lock_fd: int | None = None
        # The segment being replayed: its records, and how many were already consumed.
        self._reading: tuple[Path, list[bytes], int] | None = None
        self._count = 0

    # --- lifetime -------------------------------------------------------------------

    def open(self) -> int:
        """Create the directory, lock our file set, adopt orphans; the events found."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = self._take_lock(self._pid, block=True)
        found = self._adopt_orphans()
        found += sorted(self._dir.glob(f"{self._pid}-*{_SUFFIX}"), key=_age)
        for path in sorted(set(found), key=_age):
            self._segments.append(_Segment(path, path.stat().st_size, sealed=True))
            self._count += _count_records(path)
        if self._count:
            log.warning("spool holds %d events from before; replaying", self._count)
        return self._count

    def close(self) -> None:
        """Close files; an empty spool leaves nothing behind, a full one waits on disk."""
        with self._lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None
            if self._lock_fd is not None:
                if not self._segments:
                    Path(self._dir, f"{self._pid}.lock").unlink(missing_ok=True)
                os.close(self._lock_fd)
                self._lock_fd = None
        if not self._segments:
            try:
                self._dir.rmdir()
            except OSError:
                pass  # other processes' files, or not ours to remove

    def _take_lock(self, pid: int, *, block: bool) -> int | None:
        fd = os.open(self._dir / f"{pid}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _adopt_orphans(self) -> list[Path]:
        """Rename the segments of processes that died with events spooled into ours."""
        adopted: list[Path] = []
        for lock_path in self._dir.glob("*.lock"):
            pid = lock_path.stem
            if not pid.isdigit() or int(pid) == self._pid:
                continue
            fd = self._take_lock(int(pid), block=False)
            if fd is None:
                continue  # alive
            try:
                for path in self._dir.glob(f"{pid}-*{_SUFFIX}"):
                    mine = path.with_name(f"{self._pid}-{path.name.split('-', 1)[1]}")
                    path.rename(mine)
                    adopted.append(mine)
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return adopted

    # --- writing --------------------------------------------------------------------

    def append(self, records: list[bytes]) -> int:
        """Write as many records as fit, oldest first, then fsync; how many were taken."""
        with self._lock:
            room = self._max - self.bytes_used
            taken: list[bytes] = []
            for record in records:
                room -= len(record) + 1
                if room < 0:
                    break
                taken.append(record)
            if not taken:
                return 0
            segment = self._writable()
            data = b"\n".join(taken) + b"\n"
            assert self._file is not None
            os.write(self._file, data)
            os.fsync(self._file)
            segment.size += len(data)
            self._count += len(taken)
            if segment.size >= self._segment_bytes:
                self._seal()
            return len(taken)

    def _writable(self) -> _Segment:
        if self._file is None:
            name = f"{self._pid}-{time.time_ns():020d}{_SUFFIX}"
            path = self._dir / name
            self._file = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            self._segments.append(_Segment(path, 0))
        return self._segments[-1]

    def _seal(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
            self._segments[-1].sealed = True

    # --- reading --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def bytes_used(self) -> int:
        return sum(s.size for s in self._segments)

    def read(self, limit: int) -> Chunk | None:
        """Up to ``limit`` records from the oldest segment, or None if the spool is empty."""
        with self._lock:
            if not self._segments:
                return None
            oldest = self._segments[0]
            if not oldest.sealed:
                self._seal()  # new appends go to a fresh segment from now on
            path = oldest.path
            reading = self._reading
        if reading is None or reading[0] != path:
            reading = (path, _records(path), 0)
            with self._lock:
                self._reading = reading
        _, records, start = reading
        end = min(start + limit, len(records))
        return Chunk(path, records[start:end], end if end < len(records) else -1)

    def consume(self, chunk: Chunk) -> None:
        """The chunk's records are in Redis: never read them again."""
        with self._lock:
            self._count = max(0, self._count - len(chunk.records))
            if chunk.end >= 0:
                if self._reading is not None and self._reading[0] == chunk.segment:
                    self._reading = (chunk.segment, self._reading[1], chunk.end)
                return
            self._reading = None
            self._segments = [s for s in self._segments if s.path != chunk.segment]
        chunk.segment.unlink(missing_ok=True)


def _age(path: Path) -> str:
    """Sort key: the creation stamp in the name (pid-stamp.spool), oldest first."""
    return path.stem.split("-", 1)[-1]


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The piece after the last newline is empty, or a record torn by a crash mid-write.
    return [line for line in lines[:-1] if line]


def _count_records(path: Path) -> int:
    return len(_records(path))
