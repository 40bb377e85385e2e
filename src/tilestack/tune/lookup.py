"""Configs for a launch: the tuned one for this kernel, signature, device and size, else the kernel's default.

    cfg = launch_config("attention_fwd", "bfloat16-D128-causal", q.device, n=q.shape[2], default={...})

The first call for a (kernel, signature, device, size bucket) resolves it from the tables; every later call is
one dictionary lookup (no device query, no file read) plus the merge of the tuned values over ``default``.
Resolution, for the device's key (architecture, SM count, shared memory per block; see ``tune.devices``):

1. the tables of that key (the user's, then the shipped ones), this signature, else the same-shape signature
   (fp16 for bf16 and back: same tile sizes), at this bucket or the nearest tuned one;
2. else the same from the nearest known device of the same architecture (nearest SM count, then shared
   memory), once per device logged as a fallback;
3. else ``default``. Off a GPU (CPU, meta) always ``default``.

A config from another device that needs more shared memory than this one has is never used.

Backends: an entry names the backend it was tuned on (``"backend"``; absent: ``DEFAULT_BACKEND``, as in every
table from before the tuner searched backends) and may keep the best config of each other backend it timed
(``"others"``: backend -> {"config", "options", "seconds"}). A library function passes on the ``backend`` it
was given; given None (and the ``TILESTACK_BACKEND`` knob at "auto"), the tables choose: the result carries the
entry's backend as ``"backend"`` where it is not the default one (a launch picks that anyway), and
``take_backend`` takes it out at plan time. Given a backend, the result is that backend's own config where the
entry keeps one, else the winner's, and names none. An entry whose backend cannot launch on this device (the
gluon backend off sm_90, a backend this install lacks) gives another backend's config of the same entry, else
the next table's, else ``default``: logged once per device and backend, never an error.
"""

from __future__ import annotations

import logging

from tilestack.config import knobs
from tilestack.tune.cache import ConfigCache, launch_kwargs, lookup_entry
from tilestack.tune.devices import DeviceKey, device_key, nearest

log = logging.getLogger(__name__)

# Signatures that tune alike: fp16 and bf16 tiles have the same size, so one's table serves the other.
SAME_SHAPE = {"float16": "bfloat16", "bfloat16": "float16"}

_resolved: dict[tuple, dict | None] = {}   # (kernel, signature, device, bucket exponent, backend) -> values
_cache: ConfigCache | None = None
_views: dict[str, list[tuple[str, str, dict]]] = {}    # device key -> per known device key, nearest first
_logged: set[tuple] = set()
DEFAULT_BACKEND = "triton"   # what a table entry without "backend" was tuned on (pick_backend's for CUDA tensors)


def launch_config(kernel: str, signature: str, device, n: int, default: dict,
                  backend: str | None = DEFAULT_BACKEND) -> dict:
    """The tuned config for this launch over ``default`` (a new dict either way; see the module docstring).

    ``device`` is a ``torch.device`` or its string; one without an index means the current device when first
    seen. ``n`` is the size the kernel tunes by (sequence length, the largest GEMM dimension, the row width).
    ``backend``: the one the launch uses (left out: the default backend's config, as before the tables named
    backends, for callers that launch on it); None, as a library function passes on a ``backend=None`` it was
    given: the ``TILESTACK_BACKEND`` knob's if set, else the tables choose, and a result naming a backend other
    than the default carries it as ``"backend"`` (``take_backend`` takes it out)."""
    if backend is None and knobs.backend != "auto":
        backend = knobs.backend
    try:
        k = (kernel, signature, device, (n - 1).bit_length(), backend)
    except AttributeError:            # a NumPy integer, a SymInt: not a Python int
        k = (kernel, signature, device, (int(n) - 1).bit_length(), backend)
    try:
        tuned = _resolved[k]
    except KeyError:
        tuned = _resolved[k] = _resolve(kernel, signature, device, n, backend)
    return {**default, **tuned} if tuned else default.copy()


def take_backend(cfg: dict, backend: str | None) -> str | None:
    """The backend a launch uses: ``backend`` if the caller named one, else the tuned one ``cfg`` carries (taken
    out of ``cfg``: it is not a kernel constant), else None (``backends.pick_backend``'s default)."""
    tuned = cfg.pop("backend", None)
    return backend if backend is not None else tuned


def tuned_launcher(kernel, args, backend: str | None, asked: str | None, **consts):
    """``kernel.launcher_for(args, backend, **consts)`` at plan time, where ``backend`` is ``take_backend``'s and
    ``asked`` the one the caller named. A backend the tables chose (``asked`` None) that refuses this launch
    (a variant of the tuned kernel it cannot lower, strides its copy engine cannot take: its BackendError or
    LaunchError) gives way to the default backend, logged once per kernel and backend; a named one raises."""
    from tilestack.errors import BackendError, LaunchError

    try:
        return kernel.launcher_for(args, backend, **consts)
    except (BackendError, LaunchError) as e:
        if asked is not None or backend is None:
            raise
        if (kernel.name, backend) not in _logged:
            _logged.add((kernel.name, backend))
            log.warning("tilestack.tune: %s on backend %r, tuned for this size, refused this launch (%s: %s); "
                        "launching on the default backend.", kernel.name, backend, type(e).__name__, str(e)[:200])
        return kernel.launcher_for(args, None, **consts)


def _resolve(kernel: str, signature: str, device, n: int, backend: str | None = None) -> dict | None:
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type != "cuda":
        return None
    target = device_key(dev.index if dev.index is not None else torch.cuda.current_device())
    return resolve(kernel, signature, target, n, backend=backend)


def backend_refusal(name: str, target: DeviceKey) -> str | None:
    """Why backend ``name`` cannot launch kernels on ``target`` (None: it can, as far as the device goes; a
    backend may still refuse a kernel it cannot lower, with a BackendError when it compiles)."""
    from tilestack.backends import get_backend

    if name == "reference":
        return "the reference backend runs NumPy on the host, not on a GPU"
    try:
        get_backend(name)
    except Exception as e:  # noqa: BLE001 - not registered, or its module does not import here (no Gluon in Triton)
        return f"backend {name!r} is not available in this install ({type(e).__name__}: {e})"
    if name == "gluon":
        from tilestack.backends.gluon.launch import HOPPER
        if target.major != HOPPER:
            return f"the gluon backend generates sm_90a code (H100/H200); {target} is sm_{target.major}{target.minor}"
    return None


def gpu_backends(target: DeviceKey) -> tuple[str, ...]:
    """The registered backends that can launch on ``target`` (``tilestack tune``'s default: it searches each),
    the default one first."""
    from tilestack.backends import NAMES

    names = (DEFAULT_BACKEND, *(n for n in NAMES if n != DEFAULT_BACKEND))
    return tuple(n for n in names if backend_refusal(n, target) is None)


def _usable(entry: dict, target: DeviceKey, backend: str | None, warn: bool) -> dict | None:
    """What a launch takes from ``entry`` (see the module docstring: backends), or None if no backend of it
    can launch here."""
    won = entry.get("backend", DEFAULT_BACKEND)
    others = entry.get("others", {})
    if backend is not None:           # asked for: its own tuned config, else the winner's tunables and options
        return launch_kwargs(others[backend]) if backend != won and backend in others else launch_kwargs(entry)
    for name, e in ((won, entry), *((b, o) for b, o in others.items() if b != won)):
        why = backend_refusal(name, target)
        if why is None:
            # the default backend is what a launch picks anyway: not named, so results are as before backends
            return launch_kwargs(e) if name == DEFAULT_BACKEND else {**launch_kwargs(e), "backend": name}
        if warn and (str(target), name) not in _logged:
            _logged.add((str(target), name))
            log.warning("tilestack.tune: a tuned config for %s names backend %r, which cannot launch here (%s); "
                        "using another backend's config or the default.", target, name, why)
    return None


def resolve(kernel: str, signature: str, target: DeviceKey, n: int, cache: ConfigCache | None = None,
            backend: str | None = None) -> dict | None:
    """The tuned values for ``target`` (see the module docstring), uncached; None where nothing applies. The
    kernel's tunables and the backend's launch options come merged, as a launch takes them, with ``"backend"``
    where the tables chose one and ``backend`` is None.
    ``cache``: read these tables instead of the user's and the shipped ones (and log no fallback)."""
    bucket = 1 << max(0, (int(n) - 1).bit_length())
    dtype, _, rest = signature.partition("-")
    twin = "-".join(filter(None, (SAME_SHAPE.get(dtype, dtype), rest)))
    signatures = (signature,) if twin == signature else (signature, twin)
    devices = _devices(target, cache)
    for source, names, entries in devices:
        for sig in signatures:
            entry = lookup_entry(entries, kernel, sig, bucket)
            if entry is None or entry.get("shared_bytes", 0) > target.shared_bytes:
                continue
            cfg = _usable(entry, target, backend, warn=cache is None)
            if cfg is None:
                continue
            if source != str(target) and cache is None and (str(target), source) not in _logged:
                _logged.add((str(target), source))
                log.warning("tilestack.tune: no tuned config of %s for %s (%s); using those of the nearest known "
                            "device, %s (tuned on %s). `tilestack tune` tunes this GPU.", kernel, target,
                            target.name or "?", source, names)
            return cfg
    if not devices and cache is None and (str(target), None) not in _logged:
        _logged.add((str(target), None))
        log.warning("tilestack.tune: no tuned configs for %s (%s) or any device of its architecture; using "
                    "defaults. `tilestack tune` tunes this GPU.", target, target.name or "?")
    return None


def _devices(target: DeviceKey, cache: ConfigCache | None = None) -> list[tuple[str, str, dict]]:
    """(device key, the GPUs its tables were tuned on, its entries) for ``target``'s key, then for each nearest
    known device of its architecture. Kept per device for the shared cache."""
    global _cache
    if cache is not None:
        return _views_of(target, cache)
    if str(target) not in _views:
        if _cache is None:
            # a damaged user table (cut short, edited by hand) made every launch that looks up a config raise its
            # ValueError: the launch warns and runs on the shipped tables; `tilestack tune` still refuses it by name
            _cache = ConfigCache(damaged="warn")
        _views[str(target)] = _views_of(target, _cache)
    return _views[str(target)]


def _views_of(target: DeviceKey, cache: ConfigCache) -> list[tuple[str, str, dict]]:
    keys = dict.fromkeys(str(d) for d in nearest(target, cache.devices()))   # nearest first
    # a key's view merges all its tables, those of a name and memory size like the target's first
    like = [DeviceKey.parse(k, name=target.name, memory_gb=target.memory_gb) for k in keys]
    return [(str(d), ", ".join(t.device.name for t in cache.tables_for(d)), cache.view(d)) for d in like]


def reload() -> None:
    """Forget everything resolved and read the tables again on the next launch (after a tuning run wrote)."""
    global _cache
    _resolved.clear()
    _views.clear()
    _logged.clear()
    _cache = None
    device_key.cache_clear()
