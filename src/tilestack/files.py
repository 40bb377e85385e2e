"""Files that are written whole or not at all: every cache, table, checkpoint, record and report of tilestack.

    write_atomic(path, text_or_bytes)           # a reader sees the old file or the new one, never half of one

A write goes to a temporary of this process's own beside ``path`` (``<prefix><pid>.<random>.tmp``, the prefix
``.<name>.`` unless the caller keeps an older one), flushed to disk, then renamed over ``path``. A failure (an
interrupt, a full disk) removes the temporary and leaves the previous file. A writer SIGKILLed before its rename
cannot remove its own: the next write of the same path sweeps the temporaries of processes that are gone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
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
    except BaseException:              # (an interrupt, a full disk: no half-written temporary left behind)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def write_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` whole or not at all, in the format its suffix names (PNG without one):
    rendered in memory first, so an error of matplotlib's leaves no file at all."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
    return write_atomic(path, buf.getvalue())
