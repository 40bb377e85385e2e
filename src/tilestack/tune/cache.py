"""The tuned-config cache: chosen configs keyed by kernel, signature, device and size bucket.

    cache = ConfigCache()                                   # <cache_dir>/tuned.json, plus the shipped tables
    cache.get("attention_fwd", sig, "NVIDIA H100 80GB HBM3", bucket) -> dict | None
    cache.put(...)                                          # written whole, then renamed: never half a file

Lookups read the user's cache first, then the tables shipped with tilestack (``tune/tables/*.json``, tuned
on the project's GPUs), so a fresh install starts with good configs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tilestack.config import knobs

TABLES = Path(__file__).parent / "tables"


def size_bucket(n: int) -> int:
    """Sizes tune alike within a power of two: 3000 -> 4096."""
    return 1 << max(0, (int(n) - 1).bit_length())


def key(kernel: str, signature: str, device: str, bucket: int | str) -> str:
    return f"{kernel}|{signature}|{device}|{bucket}"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"tuned-config cache {path} is not valid JSON ({e}); delete it to start over") from e


class ConfigCache:
    def __init__(self, path: Path | None = None):
        self.path = path or knobs.cache_dir / "tuned.json"
        self._user = _read(self.path)
        self._shipped: dict[str, Any] = {}
        for table in sorted(TABLES.glob("*.json")):
            self._shipped.update(_read(table))

    def get(self, kernel: str, signature: str, device: str, bucket: int | str) -> dict | None:
        """The config tuned for this bucket, else for the nearest tuned size (in powers of two), else None."""
        k = key(kernel, signature, device, bucket)
        entry = self._user.get(k) or self._shipped.get(k)
        if entry is None:
            prefix = key(kernel, signature, device, "")
            near = [(abs(int(x).bit_length() - int(bucket).bit_length()), x, e)
                    for table in (self._user, self._shipped) for kk, e in table.items()
                    if kk.startswith(prefix) and (x := kk[len(prefix):]).isdigit()]
            entry = min(near, key=lambda t: (t[0], int(t[1])))[2] if near else None
        return dict(entry["config"]) if entry else None

    def put(self, kernel: str, signature: str, device: str, bucket: int | str, config: dict,
            **evidence) -> None:
        """Record a winner (and what it measured) in the user's cache, atomically."""
        self._user = _read(self.path)   # another process may have written since
        self._user[key(kernel, signature, device, bucket)] = {"config": config, **evidence}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".json.tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._user, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)          # a failed write (e.g. evidence JSON cannot hold) leaves no half file behind
            raise

    def entries(self) -> dict[str, Any]:
        return {**self._shipped, **self._user}
