"""The tuned-config tables shipped in src/tilestack/tune/tables/: every file is a table of one device (format 3,
named after its kernel and device), every entry is a problem `tilestack tune` knows (the kernel and the
signature its launch path builds), every config is inside its kernel's declared domains with the backend's
launch options stored apart and valid, and fits the shared memory of the device it was tuned on."""

import functools
import json

import pytest

from tilestack.backends import get_backend
from tilestack.tune import ConfigCache
from tilestack.tune.cache import FORMAT, TABLES, Table, file_name, launch_kwargs
from tilestack.tune.library import DTYPES, library_problems
from tilestack.tune.space import REGISTER_BYTES_PER_THREAD, SearchSpace

FILES = sorted(TABLES.glob("*.json"))
EVIDENCE = {"config", "options", "seconds", "tflops", "flops", "bytes", "speedup", "shared_bytes", "tried",
            "backend", "others"}      # backend: the one it was tuned on (absent: triton); others: their bests


@functools.cache
def known() -> dict:
    """(kernel, signature) -> {bucket: (tile kernel, fixed constants)} for every problem the tuner has (the
    constants can depend on the size: a row kernel keeps the row in one tile up to a width)."""
    out: dict = {}
    for p in library_problems(dtypes=DTYPES):
        out.setdefault((p.kernel, p.signature), {})[p.bucket] = (p.tile, p.fixed)
    return out


@functools.cache
def variants() -> dict:
    """(kernel, signature, schedule) -> (the variant's tile kernel, its backends): what an entry whose config
    names a ``schedule`` was tuned as (``Problem.variants``)."""
    return {(p.kernel, p.signature, v.schedule): (v.tile, v.backends)
            for p in library_problems(dtypes=DTYPES) for v in p.variants}


def tile_of(kernel_name: str, signature: str, tile, cfg: dict, backend: str):
    """(the tile kernel an entry's config is for, the config without its ``schedule``)."""
    schedule = cfg.get("schedule")
    if schedule is None:
        return tile, cfg
    assert (kernel_name, signature, schedule) in variants(), f"{kernel_name} {signature}: no variant {schedule!r}"
    vtile, backends = variants()[kernel_name, signature, schedule]
    assert backends is None or backend in backends, f"{schedule} tuned on {backend}, a variant of {backends}"
    return vtile, {k: v for k, v in cfg.items() if k != "schedule"}


@functools.cache
def small_args(kernel: str):
    """Arguments of the kernel's dtypes and ranks (footprints do not depend on the sizes)."""
    p = next(p for p in library_problems(dtypes=("bfloat16",), small=True) if p.kernel == kernel)
    return p.make("cpu").args


def entries():
    for path in FILES:
        table = Table.read(path)
        for k, entry in table.entries.items():
            yield pytest.param(table, k, entry, id=f"{path.stem}:{k}")


def test_there_are_tables_for_the_h100():
    assert FILES, f"no tables in {TABLES}"
    h100 = [t for t in map(Table.read, FILES) if t.device.name == "NVIDIA H100 80GB HBM3"]
    assert {k.split("|")[0] for t in h100 for k in t.entries} >= {"attention_fwd", "attention_bwd_dkdv",
                                                                  "attention_bwd_dq", "gemm"}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_file_is_one_kernel_on_one_device(path):
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and set(data) == {"format", "device", "entries"}
    table = Table.read(path)
    kernels = {k.split("|")[0] for k in table.entries}
    assert len(kernels) == 1 and table.entries, path.name
    assert path.name == file_name(kernels.pop(), table.device)
    assert table.device.name and table.device.sms > 0 and table.device.memory_gb > 0


def test_the_cache_loads_every_table_and_no_two_collide():
    cache = ConfigCache(tables_dir=TABLES)
    assert len(cache.shipped) == len(FILES)
    seen = set()
    for t in cache.shipped:
        for k in t.entries:
            assert (str(t.device), t.device.name, k) not in seen
            seen.add((str(t.device), t.device.name, k))


@pytest.mark.parametrize("table,key,entry", list(entries()))
def test_entry_is_a_valid_config_of_its_kernel(table, key, entry):
    kernel_name, signature, bucket = key.split("|")
    assert (kernel_name, signature) in known(), f"{kernel_name} {signature}: no such tuning problem"
    sizes = known()[kernel_name, signature]
    tile, fixed = sizes.get(int(bucket), next(iter(sizes.values())))
    assert bucket.isdigit() and int(bucket) > 0 and int(bucket) & (int(bucket) - 1) == 0, "bucket: a power of 2"
    assert set(entry) <= EVIDENCE, set(entry) - EVIDENCE
    assert entry.get("seconds", 1.0) > 0
    base = tile                       # the problem's own kernel; a config naming a schedule is its variant's
    tile, cfg = tile_of(kernel_name, signature, base, entry["config"], entry.get("backend", "triton"))
    tunables = tile.tunables
    assert set(cfg) <= set(tunables), f"not tunables of {tile.name}: {set(cfg) - set(tunables)}"
    for name, value in cfg.items():
        assert value in tunables[name].domain, f"{name}={value} outside {tunables[name].domain}"
    tile.resolve(cfg | fixed)                                        # the kernel's own check agrees
    for name, e in ((entry.get("backend", "triton"), entry), *entry.get("others", {}).items()):
        backend = get_backend(name)
        options = e["options"]                                       # the backend's, stored apart
        assert set(options) <= set(backend.search_domains()) and not set(options) & set(tunables)
        backend.check_options(options)
        its_tile, its_cfg = tile_of(kernel_name, signature, base, e["config"], name)
        assert set(its_cfg) <= set(its_tile.tunables) and e.get("seconds", 1.0) > 0
    shared, regs = SearchSpace(tile, fixed=fixed).footprint(small_args(kernel_name),
                                                           {k: v for k, v in launch_kwargs(entry).items()
                                                            if k != "schedule"})
    assert shared <= table.device.shared_bytes
    assert regs <= REGISTER_BYTES_PER_THREAD                         # the tuner would have searched it
    if "shared_bytes" in entry:
        assert entry["shared_bytes"] == shared
