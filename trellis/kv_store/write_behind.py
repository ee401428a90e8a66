"""Write-behind: committed host blocks go to the disk tier on one background thread.

A bounded queue of (hash, parent, slot). The thread calls `write(hash, parent, slot)` for each;
the store's `write` copies the slot's bytes to a file (outside its lock: a committed block is
never rewritten, and it is not evictable from the host until written) and then, under its lock,
indexes it. Invariant: every item offered is handed to `write` exactly once, or returned by
`offer` as refused (queue full, or stopped), so the store never waits on an item that will not come.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from trellis.core import log

Write = Callable[[int, int, int], None]
_STOP = None


class WriteBehind:
    def __init__(self, write: Write, maxsize: int = 1024) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[int, int, int] | None] = queue.Queue(maxsize=maxsize)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kv-store-write-behind", daemon=True)
        self._thread.start()

    def offer(self, block: int, parent: int, slot: int) -> bool:
        """Queue a block for writing; False if the queue is full or the writer stopped."""
        if self._stopped:
            return False
        try:
            self._queue.put_nowait((block, parent, slot))
        except queue.Full:
            return False
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._write(*item)
            except Exception:  # the store's write logs and counts its own I/O errors; this is a bug
                log.get().exception("write-behind: writing a block failed", block=f"{item[0]:016x}")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Write what is queued (up to `timeout_s`), then end the thread; True if it ended."""
        if self._stopped:
            return not self._thread.is_alive()
        self._stopped = True
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.get().warning("write-behind: queue still full at stop", pending=self._queue.qsize())
            return False
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.get().warning("write-behind: still writing at stop", pending=self._queue.qsize())
        return not self._thread.is_alive()
