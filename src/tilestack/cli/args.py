"""Argument checks shared by the commands: each raises ``typer.BadParameter`` naming the option, what was given and
what was expected, before the command does any work (a run that ends in an unwritable output path wastes it)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import typer


def _unreachable(option: str, path: str | os.PathLike, e: OSError, expected: str) -> typer.BadParameter:
    """The error for a path that cannot even be looked at: a folder on its way this user cannot enter (EACCES), a
    name too long (ENAMETOOLONG), a loop of links (ELOOP). pathlib's exists()/is_dir() raise these, and each came
    out of the command as a Python traceback before it said which option it was."""
    why = e.strerror or str(e)
    if e.errno == errno.EACCES:
        why += ": a folder on its way cannot be entered by this user"
    return typer.BadParameter(f"{option} {os.fspath(path)!r} cannot be looked up ({why}); expected {expected}",
                              param_hint=option)


def check_output(option: str, path: str | os.PathLike | None, *, folder: bool = False,
                 files: tuple[str, ...] = ()) -> None:
    """``path`` can be written as a file (``folder=False``) or made as a folder: it is not an existing thing of the
    other kind, and no existing folder above it is a file (``out/x.json`` below the file ``out``). ``files``: the
    names the command writes in the folder, none of which may be a folder there. None or "": not given, nothing to
    check."""
    if path is None or os.fspath(path) == "":
        return
    try:
        _check_output(option, path, folder=folder, files=files)
    except OSError as e:
        raise _unreachable(option, path, e, "a folder path" if folder else "a file path") from None


def _check_output(option: str, path: str | os.PathLike, *, folder: bool, files: tuple[str, ...]) -> None:
    p = Path(path)
    expected = "a folder path" if folder else "a file path"
    if folder and p.exists() and not p.is_dir():
        raise typer.BadParameter(f"{option} {os.fspath(p)!r} is a file; expected {expected}", param_hint=option)
    # a folder where the command writes one of its files (out/report.md made a folder) was found only when that file
    # was written, after the whole run (a bench, a profile), with an IsADirectoryError traceback
    for name in files if folder else ():
        if (p / name).is_dir():
            raise typer.BadParameter(f"{option} {os.fspath(p)!r}: {os.fspath(p / name)!r} is a folder; expected "
                                     f"{expected} where the file {name} can be written", param_hint=option)
    if not folder and p.is_dir():
        raise typer.BadParameter(f"{option} {os.fspath(p)!r} is a folder; expected {expected}", param_hint=option)
    above = next((q for q in p.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise typer.BadParameter(f"{option} {os.fspath(p)!r} cannot be made: it is below the file "
                                 f"{os.fspath(above)!r}; expected {expected}", param_hint=option)
    # the folder the output (or the folders above it) would be made in must take a new entry: a read-only one,
    # another user's, or /proc (an existing folder that refuses files, even to root) let the command run to its
    # end and then fail writing, with a traceback. Tried with an unnamed temporary file, which leaves nothing behind
    where = p if folder and p.is_dir() else above
    if where is not None:
        try:
            tempfile.TemporaryFile(dir=where).close()
        except OSError as e:
            raise typer.BadParameter(f"{option} {os.fspath(p)!r} cannot be written: the folder {os.fspath(where)!r} "
                                     f"takes no new file ({e.strerror or e}); expected {expected} in a writable "
                                     "folder", param_hint=option) from None


def check_input(option: str, path: str | os.PathLike | None) -> None:
    """``path`` is an existing file (None or "": not given)."""
    if path is None or os.fspath(path) == "":
        return
    p = Path(path)
    try:
        kind = "a file" if p.is_file() else "a folder" if p.is_dir() else None
    except OSError as e:
        raise _unreachable(option, path, e, "an existing file") from None
    if kind != "a file":
        what = kind or "not there"
        raise typer.BadParameter(f"{option} {os.fspath(p)!r} is {what}; expected an existing file", param_hint=option)


def check_share(option: str, value: float, *, one: bool = True) -> None:
    """``value`` is a share in [0, 1] (``one=False``: [0, 1), where a share of 1 leaves nothing to run)."""
    if not (0.0 <= value <= 1.0) or (value == 1.0 and not one):
        raise typer.BadParameter(f"{option} {value}; expected a share in [0, 1{']' if one else ')'}", param_hint=option)



def check_store(option: str, db: str | os.PathLike | None) -> None:
    """The result store at ``db`` (None: the default one), if it exists, reads as a SQLite database, before the
    command's work: a file that is not one (garbage, a truncated copy) was found only when the results were stored,
    after the whole profile or training run. Opened read-only, so nothing is made here (a store that does not exist
    yet is made when the results come)."""
    import sqlite3

    from tilestack.perf.store import default_path

    path = Path(db) if db is not None else default_path()
    try:
        if not path.is_file():
            return
    except OSError as e:    # (the cache folder, or a folder above --db, that this user cannot enter: a traceback)
        whence = "" if db is not None else " (below the cache folder, config.knobs.cache_dir: TILESTACK_CACHE_DIR)"
        raise typer.BadParameter(f"result store {os.fspath(path)!r}{whence} cannot be looked up ({e.strerror or e}); "
                                 "expected a SQLite file path in folders this user can enter, or --no-store",
                                 param_hint=option) from None
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            con.execute("PRAGMA schema_version").fetchone()     # reads the header: garbage is "not a database"
        finally:
            con.close()
    except sqlite3.Error as e:
        raise typer.BadParameter(f"result store {os.fspath(path)!r} is not a readable SQLite database ({e}); move "
                                 "it aside (its results are lost to tilestack), pass another path, or --no-store",
                                 param_hint=option) from e
