"""What a tuned config depends on: the GPU's architecture, SM count and shared memory per block, not its name.

    key = device_key(0)              # read once per device index from torch.cuda.get_device_properties
    str(key)                         # "sm90-132sm-227kb" (an H100 SXM, an H200: the same key)
    key.name                         # "NVIDIA H200": metadata, kept beside the tables, never part of the key
    key.shared_bytes, key.register_tile_bytes    # the limits a search space filters configs by
    target_device()                  # the current GPU's key, or HOPPER on a machine without one
    nearest(key, known)              # the known devices of the same architecture, closest first

Two GPUs with the same key run a kernel with the same tiles the same way (same SM count, same shared memory a
block may opt in to, same instruction set), so they share tuned configs whatever they are sold as. Between
devices of one key the name and memory size only break ties (an H200 prefers the table tuned on an H200).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re

from tilestack.errors import DeviceError

KIB = 1024
DEFAULT_SHARED_PER_BLOCK = 48 * KIB      # what every CUDA GPU gives a block without opting in
MAX_REGISTERS_PER_THREAD = 255           # 32-bit registers a thread may use, on every CUDA GPU since Kepler
# Register tiles per thread past which a config is not worth compiling: the IR's footprint counts every distinct
# tile as if all were live at once (an over-estimate: the largest shipped configs count 293 registers and run
# well), so the bound is 1.5x the registers a thread has (rounded up to 384 registers of 4 bytes).
REGISTER_SLACK = 1.5
_KEY = re.compile(r"^sm(\d+)(\d)-(\d+)sm-(\d+)kb$")


@dataclasses.dataclass(frozen=True)
class DeviceKey:
    major: int
    minor: int
    sms: int                 # streaming multiprocessors
    shared_kb: int           # shared memory one block may opt in to, KiB (227 on Hopper)
    # metadata: recorded beside a table, compared only to break ties between devices of one key
    name: str = dataclasses.field(default="", compare=False)
    memory_gb: float = dataclasses.field(default=0.0, compare=False)
    registers_per_thread: int = dataclasses.field(default=MAX_REGISTERS_PER_THREAD, compare=False)

    def __post_init__(self):
        # checked when made: a float major gave the key "sm9.00-132sm-227kb", a str one "sm'9'0...", a minor of 10
        # "sm910-..." which parses back as sm91 minor 0 (the key has one digit for the minor), a negative SM count or
        # a NaN memory_gb were kept; each keyed or ranked the tuner's tables wrongly without a word
        for arg, least in (("major", 1), ("minor", 0), ("sms", 1), ("shared_kb", 1), ("registers_per_thread", 1)):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise DeviceError(f"DeviceKey: {arg}={value!r:.60} ({type(value).__name__}); expected an int >= "
                                  f"{least}")
            object.__setattr__(self, arg, int(value))      # a NumPy int as the int it is
        if self.minor > 9:
            raise DeviceError(f"DeviceKey: minor={self.minor}; expected 0..9 (the key 'sm<major><minor>' holds one "
                              "digit of the minor version)")
        if not isinstance(self.name, str):
            raise DeviceError(f"DeviceKey: name={self.name!r:.60} ({type(self.name).__name__}); expected a str")
        gb = self.memory_gb
        if isinstance(gb, bool) or not isinstance(gb, numbers.Real) or not 0 <= gb < math.inf:
            raise DeviceError(f"DeviceKey: memory_gb={gb!r:.60} ({type(gb).__name__}); expected a finite number "
                              ">= 0 (GiB)")
        object.__setattr__(self, "memory_gb", float(gb))

    def __str__(self) -> str:
        return f"sm{self.major}{self.minor}-{self.sms}sm-{self.shared_kb}kb"

    @property
    def arch(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def shared_bytes(self) -> int:
        """Shared memory one block may opt in to, bytes."""
        return self.shared_kb * KIB

    @property
    def register_tile_bytes(self) -> int:
        """Bytes of register tiles per thread past which the tuner skips a config (see ``REGISTER_SLACK``)."""
        return 4 * int(REGISTER_SLACK * (self.registers_per_thread + 1))

    @classmethod
    def parse(cls, text: str, *, name: str = "", memory_gb: float = 0.0) -> DeviceKey:
        """``DeviceKey.parse("sm90-132sm-227kb")``."""
        m = _KEY.match(text) if isinstance(text, str) else None    # (a non-str failed inside re: "expected string")
        if not m:
            raise DeviceError(f"device key {text!r}; expected 'sm<major><minor>-<SMs>sm-<shared KiB>kb', "
                              "e.g. 'sm90-132sm-227kb'")
        major, minor, sms, kb = map(int, m.groups())
        return cls(major, minor, sms, kb, name=name, memory_gb=memory_gb)

    @classmethod
    def from_properties(cls, props) -> DeviceKey:
        """From ``torch.cuda.get_device_properties`` (or anything with the same fields)."""
        shared = getattr(props, "shared_memory_per_block_optin", None) or \
            getattr(props, "shared_memory_per_block", None) or DEFAULT_SHARED_PER_BLOCK
        memory = getattr(props, "total_memory", 0) or 0
        return cls(int(props.major), int(props.minor), int(props.multi_processor_count), int(shared) // KIB,
                   name=str(getattr(props, "name", "")), memory_gb=round(memory / 2**30, 1))

    def meta(self) -> dict:
        """What a table records about the device it was tuned on."""
        return {"key": str(self), "name": self.name, "capability": f"{self.major}.{self.minor}", "sms": self.sms,
                "shared_kb": self.shared_kb, "memory_gb": self.memory_gb}

    @classmethod
    def from_meta(cls, meta: dict) -> DeviceKey:
        if not isinstance(meta, dict) or "key" not in meta:
            raise DeviceError(f"table device {meta!r}; expected a dict with 'key' (and 'name', 'memory_gb')")
        return cls.parse(meta["key"], name=str(meta.get("name", "")), memory_gb=float(meta.get("memory_gb", 0)))

    @property
    def slug(self) -> str:
        """The name as a file name part: "NVIDIA H200" -> "nvidia-h200"."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "unnamed"


def device_key(index: int) -> DeviceKey:
    """The key of CUDA device ``index``, read once per process."""
    # (without a GPU this was torch's bare AssertionError "Torch not compiled with CUDA enabled"; a list index a
    # TypeError "unhashable type" from the cache; a float or str index reached torch)
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
        raise DeviceError(f"device_key: index={index!r} ({type(index).__name__}); expected a CUDA device index, an "
                          "int >= 0")
    return _device_key(int(index))


@functools.cache
def _device_key(index: int) -> DeviceKey:
    import torch

    try:
        props = torch.cuda.get_device_properties(index)
    except (AssertionError, RuntimeError) as e:   # no CUDA here, or no device of that index
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DeviceError(f"device_key: index={index} but this machine has {count} CUDA device(s) ({e}); expected "
                          "an index below that (DeviceKey.parse('sm90-132sm-227kb') names a device without "
                          "one)") from e
    return DeviceKey.from_properties(props)


device_key.cache_clear = _device_key.cache_clear   # (tune.lookup.reload and the tests forget the keys read)


# The device a search is for when no GPU says otherwise (a CPU machine preparing or testing a search): Hopper,
# the GPUs the shipped tables were tuned on (H100 SXM and H200 share this key).
HOPPER = DeviceKey(9, 0, 132, 227, name="NVIDIA H100 80GB HBM3", memory_gb=79.6)
REGISTER_BYTES_PER_THREAD = HOPPER.register_tile_bytes


def target_device(index: int | None = None) -> DeviceKey:
    """The key of CUDA device ``index`` (None: the current one), or ``HOPPER`` where there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return HOPPER
    return device_key(torch.cuda.current_device() if index is None else index)


def distance(a: DeviceKey, b: DeviceKey) -> tuple:
    """How far ``b``'s configs are from fitting ``a`` (same architecture assumed): a device with more shared memory
    than ``a`` last (its configs may not fit), then the SM-count ratio, the shared-memory gap, the memory size
    gap, and a name that differs."""
    return (b.shared_kb > a.shared_kb, abs(math.log2(b.sms / a.sms)), abs(b.shared_kb - a.shared_kb),
            abs(b.memory_gb - a.memory_gb), b.name != a.name, b.name)


def nearest(target: DeviceKey, known) -> list[DeviceKey]:
    """``known`` devices of ``target``'s architecture, closest first (those with ``target``'s key lead)."""
    same = [k for k in known if k.arch == target.arch and k.sms > 0]
    return sorted(same, key=lambda k: (str(k) != str(target), distance(target, k)))
