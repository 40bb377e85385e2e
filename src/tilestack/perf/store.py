"""Every result, appended to one SQLite file: device, versions, config and time beside the numbers.

    from tilestack.perf.store import Store
    with Store() as st:                                   # <cache_dir>/perf/results.sqlite
        run = st.start_run(device=dev, ceilings=ceil, label="nightly", command="tilestack bench")
        st.append(run, measurement)                       # committed at once: a crash keeps earlier rows
        st.runs()                                         # newest first
        st.measurements("latest")                         # Measurement objects of a run
        cmp = st.compare("latest~1", "latest")            # or two device names: latest result of each case
        cmp.rows                                          # name, config, latency A/B, speed-up B over A
        cmp.comparable, cmp.notes                         # whether anything paired; what differs and why

The file is in WAL mode and every append is its own transaction, so a run killed half-way leaves the file
readable with every row committed before the kill. A run is named by its id, a unique prefix of it,
``latest`` / ``latest~N``, or its label; a device by (a unique part of) its name.

A comparison pairs results of the same case: the same name, dtype and config. A profiled model's rows carry
the model, the step and the input shapes in their config, so two models' ``aten::mean`` never pair; where
nothing pairs the comparison says the two sides are not comparable, and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import secrets
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tilestack import config
from tilestack.errors import TilestackError
from tilestack.perf.metrics import Measurement

BUSY_TIMEOUT_MS = 10_000  # another process appending: wait this long for the write lock
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    label TEXT,
    command TEXT,
    host TEXT,
    device TEXT NOT NULL,
    device_json TEXT,
    ceilings_json TEXT,
    versions_json TEXT
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id),
    time TEXT NOT NULL,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    config_json TEXT NOT NULL,
    latency_s REAL,
    flops_per_s REAL,
    bytes_per_s REAL,
    row_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_run ON results(run_id);
CREATE INDEX IF NOT EXISTS results_case ON results(device, name, config_json);
"""



def _switch_to_wal(db: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the new file's lock: SQLite answers "database
    is locked" to a journal-mode change at once, without its busy handler, so two processes opening a new store
    together failed one of them (seen in CI, tests/test_faults_round3.py)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)

class StoreError(TilestackError, ValueError):
    """A run or device that the store cannot find, or finds more than once."""


def _locked(e: sqlite3.OperationalError) -> bool:
    """Whether ``e`` is SQLite's answer to a lock another connection held past the busy timeout."""
    return "locked" in str(e) or "busy" in str(e)


def _locked_message(path: Path, e: sqlite3.OperationalError) -> str:
    return (f"result store {path} is locked by another process ({e}; waited {BUSY_TIMEOUT_MS / 1000:g} s); its "
            "results are intact: try again when that process is done, or pass another path")


def default_path() -> Path:
    """``<cache_dir>/perf/results.sqlite``."""
    return Path(config.knobs.cache_dir) / "perf" / "results.sqlite"


def _canon(cfg: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(cfg or {}), sort_keys=True, default=str)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json(obj: Any) -> str | None:
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.describe() if hasattr(obj, "describe") else dataclasses.asdict(obj)
    return json.dumps(obj, default=str)


@dataclasses.dataclass(frozen=True)
class Run:
    id: str
    started_at: str
    label: str | None
    command: str | None
    host: str | None
    device: str
    device_info: dict[str, Any] | None
    ceilings: dict[str, Any] | None
    versions: dict[str, Any] | None
    n_results: int = 0


@dataclasses.dataclass(frozen=True)
class CompareRow:
    name: str
    config: dict[str, Any]
    a: Measurement | None
    b: Measurement | None

    @property
    def speedup(self) -> float | None:
        """How many times faster B is than A (latency A / latency B)."""
        if self.a is None or self.b is None:
            return None
        return self.a.latency_s / self.b.latency_s

    @property
    def within_noise(self) -> bool | None:
        """Whether the speed-up is within the two latencies' 95% intervals (None where either is unknown)."""
        sp = self.speedup
        if sp is None or self.a.latency_rel_ci is None or self.b.latency_rel_ci is None:
            return None
        # The ratio of two medians each known to +-r is known to about +-(r_a + r_b).
        return abs(sp - 1) <= self.a.latency_rel_ci + self.b.latency_rel_ci


@dataclasses.dataclass(frozen=True)
class Comparison:
    a_label: str
    b_label: str
    rows: list[CompareRow]
    notes: list[str] = dataclasses.field(default_factory=list)  # what differs between the sides

    @property
    def paired(self) -> list[CompareRow]:
        return [r for r in self.rows if r.a is not None and r.b is not None]

    @property
    def comparable(self) -> bool:
        """Whether any case ran on both sides."""
        return bool(self.paired)


class Store:
    """The SQLite result store at ``path`` (default :func:`default_path`)."""

    def __init__(self, path: str | Path | None = None):
        if path is not None and not isinstance(path, str | os.PathLike):   # (a bare TypeError inside pathlib)
            raise StoreError(f"result store path={path!r:.60} ({type(path).__name__}); expected a SQLite file path "
                             "(a str or pathlib.Path), or None for the default")
        self.path = Path(path) if path is not None else default_path()
        # (a folder, or a path below a file, failed with sqlite3's "unable to open database file" or a bare
        # FileExistsError naming neither the store nor what was expected)
        try:
            is_dir = self.path.is_dir()
            above = next((q for q in self.path.parents if q.exists()), None)
        except OSError as e:    # (a cache folder on its way this user cannot enter: a bare PermissionError)
            whence = " (below the cache folder, config.knobs.cache_dir: TILESTACK_CACHE_DIR)" if path is None else ""
            raise StoreError(f"result store path={str(self.path)!r}{whence} cannot be looked up ({e.strerror or e}); "
                             "expected a SQLite file path in folders this user can enter") from None
        if is_dir:
            raise StoreError(f"result store path={str(self.path)!r} is a folder; expected a SQLite file path")
        if above is not None and not above.is_dir():
            # (the default path below a cache folder that is a file named neither the knob nor its variable)
            whence = (" (the cache folder, config.knobs.cache_dir: TILESTACK_CACHE_DIR or its default)"
                      if path is None else "")
            raise StoreError(f"result store path={str(self.path)!r} cannot be made: it is below the file "
                             f"{str(above)!r}{whence}; expected a SQLite file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, transactions opened explicitly with BEGIN IMMEDIATE.
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"result store {self.path} cannot be opened ({e}); expected a SQLite file path in a "
                             "folder this process can write") from e
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            _switch_to_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process kills
            self._db.executescript(_SCHEMA)
            # written once, by the opener that made the store: an unconditional INSERT took the write lock on every
            # open, so `tilestack runs` or `compare` waited out another process's long write and then failed
            if self._db.execute("SELECT 1 FROM meta WHERE key = 'schema'").fetchone() is None:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            problem = self._foreign()
        except sqlite3.OperationalError as e:
            self._db.close()
            if _locked(e):   # (it was called "not a readable SQLite database", to be moved aside: its results lost)
                raise StoreError(_locked_message(self.path, e)) from e
            raise StoreError(f"result store {self.path} is not a readable SQLite database ({e}); move it aside "
                             "(its results are lost to tilestack) or pass another path") from e
        except sqlite3.DatabaseError as e:   # a file that is not a SQLite database (or a damaged one): said, not raw
            self._db.close()
            raise StoreError(f"result store {self.path} is not a readable SQLite database ({e}); move it aside "
                             "(its results are lost to tilestack) or pass another path") from e
        if problem:       # (a newer store was appended to without a word; another program's failed in start_run)
            self._db.close()
            raise StoreError(f"result store {self.path}: {problem}; pass another path, or move it aside")

    def _foreign(self) -> str | None:
        """What makes the open file no store this version can write: a newer schema, or tables (another
        program's) without the columns ours have; None where it is one."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None and str(row[0]).isdigit() and int(row[0]) > SCHEMA_VERSION:
            return f"schema {row[0]} is newer than this tilestack's ({SCHEMA_VERSION}): written by a newer tilestack"
        for table in ("runs", "results"):
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            want = re.findall(r"^    (\w+) ", _SCHEMA.split(f"CREATE TABLE IF NOT EXISTS {table} (")[1].split(");")[0],
                              re.M)
            if missing := [c for c in want if c not in have]:
                return f"table {table} lacks the columns {', '.join(missing)}: not a tilestack result store"
        return None

    # --- plumbing -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction; IMMEDIATE takes the write lock up front, so two writers queue, not fail."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:   # another process held the lock past BUSY_TIMEOUT_MS
            if _locked(e):
                raise StoreError(_locked_message(self.path, e)) from e
            raise
        try:
            yield
        except BaseException:
            # SQLite rolls some failures back itself (SQLITE_FULL: a full disk): a ROLLBACK then raised "no
            # transaction is active", hiding the cause
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- writing --------------------------------------------------------------------------------------------
    def start_run(
        self,
        *,
        device: Any,
        ceilings: Any = None,
        label: str | None = None,
        command: str | None = None,
        versions: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a new run and return its id (``20261121-224400-3fa2``)."""
        from tilestack.perf import device as device_mod

        # (None was stored as the device "None": every comparison by device missed it; 1.5, a list or True were
        # stored as devices named "1.5", "[1, 2]", "True" the same way)
        if not (isinstance(device, device_mod.Device) or (isinstance(device, str) and device.strip())):
            raise StoreError(f"device={device!r:.60}; expected the device the run measures (perf.detect(), or its "
                             "name as a str)")
        # (a list or dict label failed inside sqlite3's binding, an int was stored for a str)
        for arg, value in (("label", label), ("command", command)):
            if value is not None and not isinstance(value, str):
                raise StoreError(f"{arg}={value!r:.60} ({type(value).__name__}); expected a str or None")
        if ceilings is not None and not isinstance(ceilings, device_mod.Ceilings):   # (stored as its str)
            raise StoreError(f"ceilings={ceilings!r:.60} ({type(ceilings).__name__}); expected perf.ceilings(device) "
                             "or None")
        if versions is not None and not isinstance(versions, Mapping):   # (failed inside dict())
            raise StoreError(f"versions={versions!r:.60} ({type(versions).__name__}); expected a dict of package "
                             "versions (perf.versions()), or None for this process's")
        name = getattr(device, "name", None) or str(device)
        if versions is None:
            versions = device_mod.versions()
        run_id = f"{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        with self._tx():
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    _now(),
                    label,
                    command,
                    socket.gethostname(),
                    name,
                    _json(device),
                    _json(ceilings),
                    _json(dict(versions)),
                ),
            )
        return run_id

    def append(self, run_id: str, m: Measurement) -> int:
        """Append one result to ``run_id``, committed before returning; the row's id."""
        if not isinstance(m, Measurement):
            raise StoreError(f"m={m!r} ({type(m).__name__}); expected a perf.Measurement")
        if not isinstance(run_id, str):   # (a list or dict failed inside sqlite3's binding)
            raise StoreError(f"run_id={run_id!r:.60} ({type(run_id).__name__}); expected an id start_run returned")
        row = m.to_row()
        with self._tx():
            # SQLite does not enforce the REFERENCES clause (foreign keys are off): a result appended to a run id
            # that names no run was stored as an orphan no run lists, without a word
            if self._db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise StoreError(f"run_id={run_id!r} names no run in {self.path}; expected an id start_run returned")
            cur = self._db.execute(
                "INSERT INTO results (run_id, time, device, name, config_json, latency_s, flops_per_s, "
                "bytes_per_s, row_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    m.time or _now(),
                    m.device,
                    m.name,
                    _canon(m.config),
                    m.latency_s,
                    m.flops_per_s,
                    m.bytes_per_s,
                    json.dumps(row, default=_json_default),
                ),
            )
        return int(cur.lastrowid or 0)

    # --- reading --------------------------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        """Every run, newest first, with its number of results."""
        rows = self._db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM results x WHERE x.run_id = r.id) AS n "
            "FROM runs r ORDER BY r.started_at DESC, r.rowid DESC"
        ).fetchall()
        return [self._run(r) for r in rows]

    def _run(self, r: sqlite3.Row) -> Run:
        def load(column: str) -> Any:
            # (a damaged field, e.g. edited by hand or by another tool, was a JSONDecodeError traceback out of every
            # command that lists runs: `tilestack runs`, `compare`, `report`, for the whole store)
            text = r[column]
            try:
                return json.loads(text) if text else None
            except ValueError:
                warnings.warn(f"result store {self.path}: run {r['id']}'s {column} is damaged ({text!r:.40}); "
                              "read as unknown", stacklevel=4)
                return None

        return Run(
            r["id"],
            r["started_at"],
            r["label"],
            r["command"],
            r["host"],
            r["device"],
            load("device_json"),
            load("ceilings_json"),
            load("versions_json"),
            r["n"],
        )

    def run(self, ref: str) -> Run:
        """The run named by ``ref``: an id, a unique id prefix, a label, ``latest`` or ``latest~N``."""
        if not isinstance(ref, str) or not ref.strip():   # ('' is a prefix of every id: it named the only run)
            raise StoreError(f"run={ref!r}; expected a run id, a unique prefix of one, a label, latest or latest~N")
        runs = self.runs()
        if not runs:
            raise StoreError(f"run={ref!r}: the store {self.path} holds no runs yet")
        if ref == "latest" or ref.startswith("latest~"):
            back = (
                int(ref.partition("~")[2] or 0) if ref.partition("~")[2].isdigit() or ref == "latest" else -1
            )
            if not 0 <= back < len(runs):
                raise StoreError(f"run={ref!r}; expected latest or latest~N with N below {len(runs)}")
            return runs[back]
        hits = (
            [r for r in runs if r.id == ref]
            or [r for r in runs if r.id.startswith(ref)]
            or [r for r in runs if r.label == ref]
        )
        if len(hits) == 1 or (hits and hits[0].label == ref):
            return hits[0]  # a label reused by several runs means its newest
        if not hits:
            raise StoreError(f"run={ref!r} matches no run id, prefix or label in {self.path}")
        raise StoreError(
            f"run={ref!r} matches {len(hits)} runs ({', '.join(r.id for r in hits[:5])}); "
            "expected a unique prefix"
        )

    def measurements(self, ref: str) -> list[Measurement]:
        """The results of the run named by ``ref``, in the order they were appended."""
        run = self.run(ref)
        rows = self._db.execute("SELECT id, row_json FROM results WHERE run_id = ? ORDER BY id", (run.id,))
        return self._measurements(rows)

    def _measurements(self, rows) -> list[Measurement]:
        """The Measurements of ``(id, row_json)`` rows; a damaged row (not JSON, or not a result's fields) is
        skipped with one warning naming the rows, not a traceback that made the store's every run unreadable."""
        out, damaged = [], []
        for row_id, text in rows:
            try:
                out.append(Measurement.from_row(json.loads(text)))
            except (ValueError, KeyError, TypeError, AttributeError):
                damaged.append(row_id)
        if damaged:
            warnings.warn(f"result store {self.path}: {len(damaged)} damaged result row(s) skipped (ids "
                          f"{', '.join(map(str, damaged[:10]))}{' ...' if len(damaged) > 10 else ''})", stacklevel=3)
        return out

    def latest_result(self, name: str) -> tuple[str, Measurement]:
        """The newest stored result of kernel ``name``, and its run's id."""
        if not isinstance(name, str):   # (a list or dict failed inside sqlite3's binding)
            raise StoreError(f"name={name!r:.60} ({type(name).__name__}); expected a kernel's name, a str")
        row = self._db.execute(
            "SELECT run_id, id, row_json FROM results WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        if row is None:
            raise StoreError(f"name={name!r}: no stored result of that kernel in {self.path}")
        ms = self._measurements([(row["id"], row["row_json"])])
        if not ms:
            raise StoreError(f"name={name!r}: the newest stored result of that kernel in {self.path} (row "
                             f"{row['id']}) is damaged")
        return row["run_id"], ms[0]

    def devices(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT device FROM results ORDER BY device")]

    def latest_on_device(self, device: str) -> list[Measurement]:
        """The newest result of every (name, config) on the device whose name contains ``device``."""
        if not isinstance(device, str) or not device.strip():   # ('' is part of every name: it named the only one)
            raise StoreError(f"device={device!r}; expected (a unique part of) a device name in the store")
        names = [d for d in self.devices() if device.lower() in d.lower()]
        exact = [d for d in names if d == device]
        names = exact or names
        if len(names) != 1:
            raise StoreError(
                f"device={device!r} matches {len(names)} devices in the store "
                f"({', '.join(self.devices()) or 'none'}); expected exactly one"
            )
        rows = self._db.execute(
            "SELECT id, row_json FROM results WHERE id IN (SELECT MAX(id) FROM results WHERE device = ? "
            "GROUP BY name, config_json) ORDER BY id",
            (names[0],),
        )
        return self._measurements(rows)

    def _side(self, ref: str) -> tuple[str, list[Measurement], Run | None]:
        try:
            run = self.run(ref)
            return f"run {run.id} ({run.device})", self.measurements(run.id), run
        except StoreError as run_error:
            try:
                ms = self.latest_on_device(ref)
            except StoreError as device_error:
                raise StoreError(f"{run_error}; as a device: {device_error}") from None
            return f"device {ms[0].device if ms else ref}", ms, None

    def compare(self, a: str, b: str) -> Comparison:
        """Pair the results of A and B (two runs or two devices) case by case: same name, dtype and config."""
        la, ma, ra = self._side(a)
        lb, mb, rb = self._side(b)
        index_b = {case_key(m): m for m in mb}
        rows, seen = [], set()
        for m in ma:
            rows.append(CompareRow(m.name, m.config, m, index_b.get(case_key(m))))
            seen.add(case_key(m))
        rows += [CompareRow(m.name, m.config, None, m) for m in mb if case_key(m) not in seen]
        return Comparison(la, lb, rows, _differences(ma, mb, ra, rb, rows))

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def case_key(m: Measurement) -> tuple[str, str, str]:
    """What makes two results the same case: kernel (or op) name, dtype and config (a profiled op's config
    names its model, step and input shapes)."""
    return m.name, m.dtype, _canon(m.config)


def _what(ms: list[Measurement]) -> str:
    """What a side holds, in a few words: its models, else its kernels."""
    models = sorted({str(m.config["model"]) for m in ms if "model" in m.config})
    if models:
        return "model " + ", ".join(models)
    names = sorted({m.name for m in ms})
    return "kernels " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _differences(
    ma: list[Measurement], mb: list[Measurement], ra: Run | None, rb: Run | None, rows: list[CompareRow]
) -> list[str]:
    """Notes on what differs between two sides, the first saying they are not comparable where nothing pairs."""
    notes = []
    paired = sum(1 for r in rows if r.a is not None and r.b is not None)
    if not paired:
        notes.append(
            f"not comparable: no case ran on both sides (A: {_what(ma) if ma else 'no results'}; "
            f"B: {_what(mb) if mb else 'no results'}); results pair only with the same name, dtype and config "
            "(for a profile: the same model, step and input shapes)"
        )
    else:
        only_a, only_b = (sum(1 for r in rows if getattr(r, side) is None) for side in ("b", "a"))
        if only_a or only_b:
            notes.append(f"{paired} cases paired; {only_a} only in A, {only_b} only in B")
    devices_a, devices_b = {m.device for m in ma}, {m.device for m in mb}
    if ma and mb and devices_a != devices_b:
        notes.append(f"devices differ (A: {', '.join(sorted(devices_a))}; B: {', '.join(sorted(devices_b))})")
    if ra is not None and rb is not None:
        va, vb = ra.versions or {}, rb.versions or {}
        changed = [f"{k} {va.get(k)} -> {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        if changed:
            notes.append("versions differ: " + ", ".join(changed))
    return notes


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float | int | str):
        return obj
    return str(obj)
