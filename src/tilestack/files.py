"""Files that are written whole or not at all: every cache, table, checkpoint, record and report of tilestack.

    write_atomic(path, text_or_bytes)           # a reader sees the old file or the new one, never half of one

A write goes to a temporary of this process's own beside ``path`` (``<prefix><pid>.<random>.tmp``, the prefix
``.<name>.`` unless the caller keeps an older one), flushed to disk, then renamed over ``path`` (the folder synced
after, so that the rename holds too; a link at ``path`` is followed, as ``open(path, "w")`` would). A failure (an
interrupt, a full disk) removes the temporary, leaves the previous file and, for an OSError, names ``path``. A
writer SIGKILLed before its rename cannot remove its own: the next write of the same path sweeps the temporaries
of processes that are gone.

    with held_lock(path): ...                   # one run at a time: a second holder gets LockHeldError

A run that writes a checkpoint or an output folder holds a lock file beside it (``fcntl.flock``, made if absent) for as
long as it writes; the lock goes with the process (a killed run holds none), a file system without locks runs
unheld, and a forked child (a worker pool that outlives the run) closes its inherited copies.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def sweep_dead_temporaries(folder: Path, prefix: str) -> None:
    """Remove the temporaries ``<prefix><pid>.<random>.tmp`` in ``folder`` whose writer process no longer exists:
    a writer SIGKILLed mid-write leaves one, and each kill would add another for good. A live writer's stays."""
    for tmp in Path(folder).glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue                   # (a name of another form; this process's own is never left behind)
        try:
            os.kill(int(pid), 0)       # signal 0: whether the process exists, nothing sent
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except (PermissionError, OverflowError):
            continue                   # another user's live process (or no such pid number): keep it


NAME_MAX = 255             # bytes in a file name (ext4, xfs, btrfs, APFS)
TMP_ROOM = 32              # what a temporary's name adds after its prefix: "<pid>.<8 hex digits>.tmp", and to spare


def _fit(prefix: str) -> str:
    """``prefix`` cut to leave a temporary's name room under NAME_MAX: a file name of 224 to 255 bytes, which
    open(path, "w") takes, failed with "File name too long" on its temporary. Sweeps cut it alike, so they still
    find its temporaries (and those of another long name with the same start, which are as safely removed)."""
    raw = prefix.encode("utf-8", "surrogateescape")
    return prefix if len(raw) <= NAME_MAX - TMP_ROOM else raw[:NAME_MAX - TMP_ROOM].decode("utf-8", "ignore")


def write_atomic(path: str | os.PathLike, data: str | bytes, *, tmp_prefix: str | None = None) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` whole or not at all; its folder is made. ``tmp_prefix`` names the
    temporaries (default ``.<name>.``); files that predate this module keep theirs, so that the temporaries their
    killed writers left are still swept."""
    path = Path(path)
    if path.is_symlink():   # the file it names is written, as open(path, "w") would: the rename replaced the link
        path = Path(os.path.realpath(path))     # itself with a copy, and the file shared through it was left behind
        if path.is_symlink():
            raise OSError(errno.ELOOP, "is a loop of symbolic links; expected a file path to write", str(path))
    prefix = _fit(f".{path.name}." if tmp_prefix is None else tmp_prefix)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if path.is_dir():       # (said before a temporary is made; the rename's error named the temporary first)
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file path to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead_temporaries(path.parent, prefix)
    tmp = path.with_name(f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never another writer's file; mode 0o666 under the umask, as open(path, "w") would make the file
    # (tempfile.mkstemp's 0o600 made every report and table readable by its owner only)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:    # (a read-only folder: the error named only the temporary, a name the caller never gave)
        raise type(e)(e.errno, f"{e.strerror} (writing it whole through the temporary {tmp.name} beside it)",
                      str(path)) from None
    try:
        try:
            view = memoryview(payload)
            while view:                # (os.write may write less than it is given)
                view = view[os.write(fd, view):]
            os.fsync(fd)               # the data on disk before the rename: a power cut cannot leave an empty file
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _sync_folder(path.parent)      # the rename on disk too: a power cut after it could bring the old file back
    except BaseException as e:         # (an interrupt, a full disk: no half-written temporary left behind)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):     # (os.write's and os.fsync's errors named no file: "[Errno 28] No space left
            raise _naming(e, path) from e  # on device", whichever of the caches or checkpoints it was)
        raise
    return path


def _sync_folder(folder: Path) -> None:
    """fsync ``folder``'s entries (a rename is a change of its folder). Best effort: a file system or platform that
    cannot open or sync a folder (Windows, some network mounts) keeps the rename as the OS does."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` (its class, errno and reason) said of ``path``, the file asked for, which is left as it was."""
    why = e.strerror or str(e) or type(e).__name__
    return type(e)(e.errno, f"{why} (writing it whole through a temporary beside it; the file is left as it was)",
                   str(path))


def write_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` whole or not at all, in the format its suffix names (PNG without one):
    rendered in memory first, so an error of matplotlib's leaves no file at all."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
    return write_atomic(path, buf.getvalue())


class LockHeldError(BlockingIOError):
    """Another process (or another run of this one) holds the lock file."""


_HELD_LOCKS: set[int] = set()   # the lock files (fds) held_lock holds in this process


def _drop_held_locks() -> None:
    """In a forked child, close the inherited copies of the held lock files: an flock lasts while any copy is open,
    so the idle workers of a pool that outlived its run kept the next run (a resume) refused as in use."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_held_locks)


@contextlib.contextmanager
def held_lock(lock: str | os.PathLike) -> Iterator[None]:
    """Hold ``lock`` (an exclusive flock of that file, made if absent) for the block; LockHeldError at once where
    another holder has it. The OSError of a lock file that cannot be made propagates; a file system without locks
    (some NFS) runs the block unheld."""
    import fcntl

    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(errno.EWOULDBLOCK, "held by another run", str(lock)) from None
        except OSError:
            pass
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)                    # closing releases the lock
