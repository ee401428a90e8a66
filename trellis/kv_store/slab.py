"""The host tier's bytes: one shared-memory file of ``num_slots`` slots of ``slot_bytes`` each.

The file is ``{shm_dir}/trellis-kv-{name}-{instance_id}``. Its owner holds an exclusive ``flock``
on it for as long as it lives, so at start a store unlinks every ``trellis-kv-{name}-*`` whose lock
it can take: the slab of a dead instance (killed, crashed) of the same store, never a live one.
The space is allocated up front (posix_fallocate), after an ``os.statvfs`` check, so a full tmpfs
is a ConfigError at start and never a SIGBUS at the first write.

Invariant: a slot's bytes are only ever written by the writer its put ticket named (or by the
store itself, promoting a block from disk); this module does no accounting of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from pathlib import Path

import numpy as np

from trellis.core import log
from trellis.core.errors import ConfigError

PREFIX = "trellis-kv-"


def slab_name(name: str, instance_id: str) -> str:
    return f"{PREFIX}{name}-{instance_id}"


def remove_dead_slabs(shm_dir: Path, name: str) -> list[Path]:
    """Unlink the slabs of dead instances of store `name` in `shm_dir` (those nobody holds locked)."""
    removed = []
    for path in shm_dir.glob(f"{PREFIX}{name}-*"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            log.get().warning("cannot open a leftover slab", path=str(path), error=e.strerror)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live store holds it
            continue
        try:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.get().info("removed the slabs of dead instances", paths=[str(p) for p in removed])
    return removed


class Slab:
    """A mapped slab; `slots` is a writable uint8 view ``[num_slots, slot_bytes]`` of the file."""

    def __init__(self, path: Path, fd: int, num_slots: int, slot_bytes: int) -> None:
        self.path = path
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._fd = fd
        self._map: mmap.mmap | None = mmap.mmap(fd, num_slots * slot_bytes)
        self.slots: np.ndarray = np.frombuffer(self._map, dtype=np.uint8).reshape(num_slots, slot_bytes)

    @classmethod
    def create(
        cls,
        shm_dir: str | Path,
        name: str,
        instance_id: str,
        num_slots: int,
        slot_bytes: int,
        *,
        field: str = "kv_store",
    ) -> Slab:
        """Create, lock and map a new slab (after unlinking dead instances' slabs of `name`).

        ConfigError naming the spec's fields (``field``: kv_store, or engine.handoff for a decode
        replica's hand-off slab) if the directory is missing or lacks room."""
        sizes, where_f = (
            ("kv_store.capacity_bytes", "kv_store.shm_dir")
            if field == "kv_store"
            else (f"{field}_slots", f"{field}_dir")
        )
        if num_slots < 1:
            raise ConfigError(f"{sizes}: less than one slot of {slot_bytes} bytes")
        where = Path(shm_dir)
        if not where.is_dir():
            raise ConfigError(f"{where_f}: {where} is not a directory")
        remove_dead_slabs(where, name)
        size = num_slots * slot_bytes
        st = os.statvfs(where)
        room = st.f_bavail * st.f_frsize
        if room < size:
            raise ConfigError(
                f"{where_f}: {where} has {room} bytes free, the slab needs {size} "
                f"({num_slots} slots of {slot_bytes}); lower {sizes} or free room"
            )
        path = where / slab_name(name, instance_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o660)
        except OSError as e:
            raise ConfigError(f"{where_f}: cannot create {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
            with contextlib.suppress(OSError):  # not every filesystem allocates; statvfs checked room
                os.posix_fallocate(fd, 0, size)
            return cls(path, fd, num_slots, slot_bytes)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise ConfigError(f"{where_f}: cannot allocate {size} bytes in {path}: {e.strerror}") from None

    def view(self, slot: int) -> np.ndarray:
        """Slot `slot`'s bytes, as a writable uint8 view (no copy)."""
        return self.slots[slot]

    def read(self, slot: int) -> bytes:
        return self.slots[slot].tobytes()

    def write(self, slot: int, data: bytes | memoryview | np.ndarray) -> None:
        """Fill slot `slot`; `data` must be exactly slot_bytes long."""
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
        if src.size != self.slot_bytes:
            raise ValueError(f"a slot holds {self.slot_bytes} bytes, got {src.size}")
        self.slots[slot] = src.reshape(-1)

    def close(self, *, unlink: bool = True) -> None:
        """Unmap, unlock and (by default) unlink the file. Idempotent."""
        if self._map is None:
            return
        self.slots = np.empty((0, self.slot_bytes), dtype=np.uint8)
        try:
            self._map.close()
        except BufferError:  # a view is still held somewhere: the mapping goes with the process
            log.get().warning(
                "slab views still held at close; the mapping stays until exit", path=str(self.path)
            )
        self._map = None
        if unlink:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
