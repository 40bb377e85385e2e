"""Tuned configs on disk: tables of chosen configs, one device each, keyed by kernel, signature and size bucket.

    cache = ConfigCache()                          # the user's tables (<cache_dir>/tuned/) over the shipped ones
    dev = device_key(0)                            # DeviceKey: "sm90-132sm-227kb", name "NVIDIA H200"
    cache.get("attention_fwd", "bfloat16-D128-causal", dev, 4096) -> {"BM": 128, ..., "num_warps": 8} | None
    cache.put("attention_fwd", sig, dev, 4096, cfg, seconds=...)   # written whole, then renamed

A table is a JSON file::

    {"format": 3,
     "device": {"key": "sm90-132sm-227kb", "name": "NVIDIA H200", "capability": "9.0", "sms": 132, ...},
     "entries": {"attention_fwd|bfloat16-D128-causal|4096": {"config": {"BM": 128, "BN": 64},
                                                              "options": {"num_warps": 8, "num_stages": 3},
                                                              "seconds": ..., ...}}}

An entry keeps the kernel's tunables (``config``) apart from the backend's launch options (``options``); a
lookup gives them merged, as a launch takes them (``kernel(*args, **cfg)`` sends the options to the backend).
Tables of format 2 (one flat ``config``) are read too, their launch options moved to ``options`` as they load.

Tables ship in ``tune/tables/`` (tuned on the project's GPUs, one file per kernel and device); ``tilestack tune``
writes the user's own, one file per device key, in ``<cache_dir>/tuned/``. A lookup for a device reads every
table of its key: the user's first, then those tuned on a GPU of the same name, then the others of that key
(closest memory size first).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tilestack.config import knobs
from tilestack.errors import TunableError
from tilestack.files import write_atomic
from tilestack.tune.devices import DeviceKey

TABLES = Path(__file__).parent / "tables"
FORMAT = 3
READS = (2, 3)       # format 2: tunables and launch options in one flat "config"


def size_bucket(n: int) -> int:
    """Sizes tune alike within a power of two: 3000 -> 4096."""
    # (int(n) took "100" and 100.5 as 128, -1 as 4, and NaN failed in int(): "cannot convert float NaN")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise TunableError(f"size_bucket: n={n!r} ({type(n).__name__}); expected a size, an int >= 0")
    # (n=0 answered 2, above size_bucket(1) == 1: (-1).bit_length() is 1)
    return 1 << max(0, (max(int(n), 1) - 1).bit_length())


def _check_entry_key(method: str, kernel, signature, device, bucket) -> None:
    """TunableError naming the argument of ConfigCache.get / put that cannot key a table's entry (a str device
    key failed as "'str' object has no attribute 'meta'")."""
    for name, value in (("kernel", kernel), ("signature", signature)):
        if not isinstance(value, str) or "|" in value:
            raise TunableError(f"ConfigCache.{method}: {name}={value!r}; expected a str without '|' (it keys the "
                               "table's entries)")
    if not isinstance(device, DeviceKey):
        raise TunableError(f"ConfigCache.{method}: device={device!r} ({type(device).__name__}); expected a DeviceKey "
                           "(tune.device_key(0), or DeviceKey.parse('sm90-132sm-227kb'))")
    if isinstance(bucket, bool) or not (isinstance(bucket, numbers.Integral) and bucket >= 1 or
                                        method == "put" and isinstance(bucket, str) and "|" not in bucket):
        raise TunableError(f"ConfigCache.{method}: bucket={bucket!r}; expected a size bucket, an int >= 1 "
                           "(size_bucket(n))")


def key(kernel: str, signature: str, bucket: int | str) -> str:
    """An entry's key inside a table (the table says which device)."""
    return f"{kernel}|{signature}|{bucket}"


def split_options(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the kernel's tunables, the backends' launch options) of a flat config, by the options' names."""
    from tilestack.backends import launch_option_names

    names = launch_option_names()
    return ({k: v for k, v in config.items() if k not in names}, {k: v for k, v in config.items() if k in names})


def upgrade_entry(entry: dict) -> dict:
    """A format-2 entry (launch options inside ``config``) in format 3 (apart, in ``options``); the same values."""
    if "options" in entry or not isinstance(entry.get("config"), dict):
        return entry
    config, options = split_options(entry["config"])
    return {**entry, "config": config, "options": options}


def launch_kwargs(entry: dict) -> dict[str, Any]:
    """What a launch takes from an entry: its tunables and its launch options, in one new dict."""
    return {**entry["config"], **entry.get("options", {})}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all (``tilestack.files.write_atomic``; its temporaries
    named ``.<stem>.<pid>.*.tmp``, as they were before that module)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", tmp_prefix=f".{Path(path).stem}.")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` of the folder itself: no lock file left behind) for a
    read-modify-write of a file in it: two processes update it in turn, neither losing the other's change."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):     # a file system without locks (some NFS): as before, unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                   # closing releases the lock


class Table:
    """The tuned entries of one device."""

    def __init__(self, device: DeviceKey, entries: dict[str, dict] | None = None, path: Path | None = None):
        self.device = device
        self.entries: dict[str, dict] = dict(entries or {})
        self.path = path

    @classmethod
    def read(cls, path: Path) -> Table | None:
        """The table in ``path``; None if there is no such file. A file that is not a table (garbage bytes, a
        truncated file, JSON of another shape) is a ValueError that names it and says what to do."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:       # ValueError: not JSON, or not UTF-8 text
            raise ValueError(f"tuned-config table {path} is not valid JSON ({type(e).__name__}: {e}); delete it "
                             "to start over") from e
        if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] > FORMAT:
            # (it was refused as "a table from before device keys", sending the user to delete a newer table)
            raise ValueError(f"tuned-config table {path} is of format {data['format']}, written by a newer tilestack;"
                             f" this one reads formats {READS}: upgrade tilestack, or delete the file to start over")
        if not isinstance(data, dict) or data.get("format", FORMAT) not in READS or \
                not isinstance(data.get("entries"), dict) or "device" not in data:
            raise ValueError(f"tuned-config table {path}: expected {{'format': {FORMAT}, 'device': {{...}}, "
                             f"'entries': {{...}}}}; got keys {sorted(data) if isinstance(data, dict) else data!r}"
                             " (a table from before device keys: delete it, or re-run `tilestack tune`)")
        bad = [k for k, e in data["entries"].items()
               if not (isinstance(e, dict) and isinstance(e.get("config"), dict)
                       and isinstance(e.get("options", {}), dict) and k.count("|") == 2)]
        if bad:
            raise ValueError(f"tuned-config table {path}: entry {bad[0]!r} is not 'kernel|signature|bucket': "
                             "{'config': {...}, 'options': {...}}; delete the file, or re-run `tilestack tune`")
        try:
            device = DeviceKey.from_meta(data["device"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tuned-config table {path}: its 'device' is not a device key ({type(e).__name__}: "
                             f"{e}); delete the file, or re-run `tilestack tune`") from e
        entries = {k: upgrade_entry(e) for k, e in data["entries"].items()}     # format 2's flat configs split
        return cls(device, entries, path)

    def to_json(self) -> dict:
        return {"format": FORMAT, "device": self.device.meta(), "entries": self.entries}

    def write(self, path: Path | None = None) -> None:
        write_json_atomic(path or self.path, self.to_json())


def _read_user(path: Path, damaged: str) -> Table | None:
    """``Table.read(path)``; with ``damaged="warn"``, None and a warning where the table cannot be read."""
    try:
        return Table.read(path)
    except ValueError as e:
        if damaged == "raise":
            raise
        warnings.warn(f"{e}; this process leaves it out and uses the shipped tables", stacklevel=4)
        return None


def _user_tables(folder: Path, damaged: str) -> dict[str, Table]:
    """The user's tables in ``folder`` by device key. A folder this user cannot enter (a cache folder of another
    user's, mode 000) raised a bare PermissionError out of every kernel launch's first lookup: it is a ValueError
    naming it, or with ``damaged="warn"`` a warning, and no user tables."""
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError as e:
        said = (f"tuned-config folder {folder} cannot be read ({e.strerror or e}); expected a folder this user can "
                "enter (set TILESTACK_CACHE_DIR to one)")
        if damaged == "raise":
            raise ValueError(said) from None
        warnings.warn(f"{said}; this process uses the shipped tables", stacklevel=4)
        return {}
    return {str(t.device): t for p in paths if (t := _read_user(p, damaged))}


def file_name(kernel: str, device: DeviceKey) -> str:
    """A shipped table's file name: one kernel on one device, "gemm_sm90-132sm-227kb_nvidia-h200.json"."""
    return f"{kernel}_{device}_{device.slug}.json"


def lookup_entry(entries: dict[str, dict], kernel: str, signature: str, bucket: int) -> dict | None:
    """The entry for this bucket, else the nearest tuned bucket (in powers of two; a tie takes the smaller)."""
    entry = entries.get(key(kernel, signature, bucket))
    if entry is not None:
        return entry
    prefix = key(kernel, signature, "")
    near = [(abs(int(b).bit_length() - int(bucket).bit_length()), int(b), e) for k, e in entries.items()
            if k.startswith(prefix) and (b := k[len(prefix):]).isdigit()]
    return min(near, key=lambda t: t[:2])[2] if near else None


class ConfigCache:
    """The user's tables over the shipped ones (see the module docstring)."""

    def __init__(self, cache_dir: Path | None = None, tables_dir: Path | None = TABLES, *, damaged: str = "raise"):
        """``damaged``: what a user table that cannot be read does: ``"raise"`` its ValueError (naming it and what to
        do), or ``"warn"`` and leave it out (a kernel launch: its shipped tables still apply)."""
        # a folder given as a str was taken for cache_dir but failed for tables_dir ("'str' object has no attribute
        # 'glob'"), a number inside pathlib: each is a path or None, refused by name otherwise
        for arg, value in (("cache_dir", cache_dir), ("tables_dir", tables_dir)):
            if value is not None and not isinstance(value, str | os.PathLike):
                raise TunableError(f"ConfigCache: {arg}={value!r:.60} ({type(value).__name__}); expected a folder "
                                   "(a str or pathlib.Path) or None")
        if damaged not in ("raise", "warn"):
            raise TunableError(f"ConfigCache: damaged={damaged!r}; expected 'raise' or 'warn'")
        tables_dir = Path(tables_dir) if tables_dir else None     # ("" as None, as before: no shipped tables)
        self.dir = Path(cache_dir or knobs.cache_dir) / "tuned"
        self.shipped = [t for p in sorted(tables_dir.glob("*.json")) if (t := Table.read(p))] if tables_dir else []
        self.user = _user_tables(self.dir, damaged)

    def user_path(self, device: DeviceKey) -> Path:
        return self.dir / f"{device}.json"

    def devices(self) -> list[DeviceKey]:
        """Every device some table was tuned on (one per key and name)."""
        seen = {(str(t.device), t.device.name): t.device for t in [*self.user.values(), *self.shipped]}
        return list(seen.values())

    def tables_for(self, device: DeviceKey) -> list[Table]:
        """The tables of ``device``'s key, most trusted first: the user's, the same name's, the nearest memory."""
        same = [t for t in self.shipped if str(t.device) == str(device)]
        same.sort(key=lambda t: (t.device.name != device.name, abs(t.device.memory_gb - device.memory_gb)))
        user = self.user.get(str(device))
        return [user, *same] if user else same

    def view(self, device: DeviceKey) -> dict[str, dict]:
        """Every entry for ``device``'s key, the most trusted table's where two have one."""
        merged: dict[str, dict] = {}
        for table in reversed(self.tables_for(device)):
            merged.update(table.entries)
        return merged

    def get(self, kernel: str, signature: str, device: DeviceKey, bucket: int) -> dict | None:
        """The config tuned for ``device``'s key at this bucket (else the nearest bucket), as a launch takes it
        (tunables and launch options in one new dict), or None."""
        _check_entry_key("get", kernel, signature, device, bucket)
        entry = lookup_entry(self.view(device), kernel, signature, bucket)
        return launch_kwargs(entry) if entry else None

    def put(self, kernel: str, signature: str, device: DeviceKey, bucket: int | str, config: dict,
            options: dict | None = None, **evidence) -> None:
        """Record a winner (and what it measured) in the user's table for ``device``, atomically: its tunables
        ``config`` and launch ``options`` apart (``options=None``: taken out of ``config`` by name)."""
        _check_entry_key("put", kernel, signature, device, bucket)
        for name, value in (("config", config), ("options", options)):
            if not isinstance(value, dict) and not (name == "options" and value is None):
                raise TunableError(f"ConfigCache.put: {name}={value!r:.60} ({type(value).__name__}); expected a dict "
                                   "of the winner's " + ("constants" if name == "config" else "launch options"))
        config, found = split_options(config) if options is None else (dict(config), dict(options))
        path = self.user_path(device)
        entry = {"config": config, "options": found, **evidence}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked(path.parent):          # read, add, write in turn with any other process tuning this device
                table = self._user_table_on_disk(path, device)
                table.device = device                            # the name of the GPU that tuned it last
                table.entries[key(kernel, signature, bucket)] = entry
                table.write(path)
        except OSError as e:            # a read-only cache: the winner is kept for this process only
            warnings.warn(f"tuned config not saved: cannot write {path} ({e}); it is used by this process only "
                          "(set TILESTACK_CACHE_DIR to a writable folder to keep it)", stacklevel=2)
            table = self.user.get(str(device)) or Table(device, path=path)
            table.entries[key(kernel, signature, bucket)] = entry
        self.user[str(device)] = table

    @staticmethod
    def _user_table_on_disk(path: Path, device: DeviceKey) -> Table:
        """The user's table as on disk now (another process may have written since); a file that is not a
        table is moved aside to ``<name>.corrupt``, with a warning, and a new table started."""
        try:
            return Table.read(path) or Table(device, path=path)
        except ValueError as e:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            warnings.warn(f"{e}: moved to {aside}; a new table is started", stacklevel=3)
            return Table(device, path=path)

    def entries(self, device: DeviceKey | None = None) -> dict[str, dict]:
        """Every entry as "kernel|signature|device key|bucket" (or only ``device``'s view, keyed as in tables)."""
        if device is not None:
            return self.view(device)
        out: dict[str, dict] = {}
        for table in [*self.shipped, *self.user.values()]:
            for k, e in table.entries.items():
                kernel, sig, bucket = k.split("|")
                out[f"{kernel}|{sig}|{table.device}|{bucket}"] = e
        return out
