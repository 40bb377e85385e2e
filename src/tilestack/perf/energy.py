"""Energy and power from NVML's total-energy counter, over windows long enough for it to mean something.

    from tilestack.perf import energy
    meter = energy.EnergyMeter(0)               # GPU index; meter.available False (with .reason) without NVML
    with meter.window() as w:
        run_for_a_second()                      # the GPU must be synchronised before the window closes
    w.result.joules, w.result.avg_power_w, w.result.valid, w.result.note
    s = energy.measure_energy(fn, args_sets=sets, per_call_s=t.median_s, meter=meter)
    s.joules_per_call, s.avg_power_w

``nvmlDeviceGetTotalEnergyConsumption`` counts millijoules since the driver loaded (Volta and later); it
updates every 10 to 100 ms, so a window shorter than ``MIN_WINDOW_S`` is mostly quantisation error: such a
window is returned with ``valid=False`` and a note saying so, never silently. The counter is board energy
(GPU and HBM), not one kernel's: ``measure_energy`` repeats the call back to back until the window is long
enough and divides by the number of calls. NVML's power reading (``nvmlDeviceGetPowerUsage``) is a 1 s
average on recent GPUs: ``meter.power_w()`` gives it, for a glance; energies come from the counter only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tilestack.errors import DeviceError

MIN_WINDOW_S = 1.0  # the counter updates every 10-100 ms: 1 s keeps quantisation error to a few per cent
MJ_TO_J = 1e-3
MW_TO_W = 1e-3
MAX_ENERGY_CALLS = 1_000_000
WINDOW_MARGIN = 1.1  # run a little past the minimum, so the window clears it after the final sync
CHUNK_S = 0.05

_nvml_state: dict[str, Any] = {"init": None, "error": None}


def _nvml() -> Any:
    """The initialised pynvml module, or raise RuntimeError saying why it cannot be used here."""
    if _nvml_state["init"] is None and _nvml_state["error"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml_state["init"] = pynvml
        except ImportError:
            _nvml_state["error"] = "pynvml (nvidia-ml-py) is not installed"
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            _nvml_state["error"] = f"NVML cannot start here ({type(e).__name__}: {e}); no NVIDIA driver?"
    if _nvml_state["error"]:
        raise RuntimeError(_nvml_state["error"])
    return _nvml_state["init"]


def driver_version() -> str | None:
    """The NVIDIA driver's version, or None without one."""
    try:
        v = _nvml().nvmlSystemGetDriverVersion()
    except Exception:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _count(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and >= 0."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)


@dataclasses.dataclass(frozen=True)
class EnergyWindow:
    """Energy over one window; ``valid`` False (and ``note`` why) when too short or unmeasured."""

    joules: float | None
    seconds: float
    valid: bool
    note: str = ""

    def __post_init__(self) -> None:
        # profiler round 23: negative or NaN joules, or a negative time, gave negative or NaN energies per call and
        # FLOP per joule, and a valid window with no joules a TypeError in the division
        if self.joules is not None and not _count(self.joules):
            raise DeviceError(f"EnergyWindow: joules={self.joules!r} ({type(self.joules).__name__}); expected a "
                              "finite energy >= 0, or None where unmeasured")
        if not _count(self.seconds):
            raise DeviceError(f"EnergyWindow: seconds={self.seconds!r} ({type(self.seconds).__name__}); expected the "
                              "window's finite length >= 0")
        if not isinstance(self.valid, bool) or (self.valid and self.joules is None):
            raise DeviceError(f"EnergyWindow: valid={self.valid!r} with joules={self.joules!r}; expected True or "
                              "False, and False where no energy was measured")

    @property
    def avg_power_w(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds > 0 else None


@dataclasses.dataclass(frozen=True)
class EnergySample:
    """Energy of ``calls`` back-to-back calls of one fn, and what that makes per call."""

    window: EnergyWindow
    calls: int
    idle_power_w: float | None = None

    def __post_init__(self) -> None:
        # profiler round 23: calls=0 under a valid window divided by zero; negative calls or idle power were taken
        if not isinstance(self.window, EnergyWindow):
            raise DeviceError(f"EnergySample: window={self.window!r:.60} ({type(self.window).__name__}); expected an "
                              "EnergyWindow")
        if isinstance(self.calls, bool) or not isinstance(self.calls, numbers.Integral) or self.calls < 0 \
                or (self.window.valid and self.calls == 0):
            raise DeviceError(f"EnergySample: calls={self.calls!r} ({type(self.calls).__name__}); expected the int "
                              "number of calls the window measured (>= 1 for a valid window)")
        if self.idle_power_w is not None and not _count(self.idle_power_w):
            raise DeviceError(f"EnergySample: idle_power_w={self.idle_power_w!r} "
                              f"({type(self.idle_power_w).__name__}); expected a finite power >= 0 in W, or None")

    @property
    def valid(self) -> bool:
        return self.window.valid

    @property
    def note(self) -> str:
        return self.window.note

    @property
    def joules_per_call(self) -> float | None:
        return self.window.joules / self.calls if self.window.valid and self.window.joules is not None else None

    @property
    def avg_power_w(self) -> float | None:
        return self.window.avg_power_w if self.window.valid else None


class EnergyMeter:
    """NVML's energy counter of one GPU. ``available`` False (``reason`` why) where it cannot be read."""

    def __init__(self, index: int = 0, pci_bus_id: str | None = None):
        """``index`` is NVML's; ``pci_bus_id`` (``"00000000:19:00.0"``), where known, finds the GPU whatever
        ``CUDA_VISIBLE_DEVICES`` renumbered, and wins over ``index``."""
        # refused by name: index="x" or -1 made a meter that is never available, its reason a comparison's TypeError
        # or NVML's own words, and energy went unmeasured without a word
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise DeviceError(f"EnergyMeter: index={index!r:.60} ({type(index).__name__}); expected NVML's GPU index, "
                              "an int >= 0")
        if pci_bus_id is not None and not isinstance(pci_bus_id, str):
            raise DeviceError(f"EnergyMeter: pci_bus_id={pci_bus_id!r:.60} ({type(pci_bus_id).__name__}); expected "
                              "None or the GPU's PCI bus id, a str ('00000000:19:00.0')")
        index = int(index)
        self.index = index
        self.reason = ""
        self._handle: Any = None
        try:
            nv = _nvml()
            if pci_bus_id:
                try:
                    self._handle = nv.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
                except Exception:
                    self._handle = None  # an unexpected bus-id format: fall back to the index
            if self._handle is None:
                count = nv.nvmlDeviceGetCount()
                if index >= count:
                    raise RuntimeError(f"GPU index={index}; NVML sees {count} GPU(s)")
                self._handle = nv.nvmlDeviceGetHandleByIndex(index)
            nv.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # not supported before Volta
        except Exception as e:
            self._handle = None
            self.reason = str(e) or type(e).__name__

    @property
    def available(self) -> bool:
        return self._handle is not None

    def energy_mj(self) -> int:
        """Millijoules since the driver loaded."""
        return _nvml().nvmlDeviceGetTotalEnergyConsumption(self._handle)

    def power_w(self) -> float | None:
        """NVML's (averaged) power reading in watts, or None where it cannot be read."""
        try:
            return _nvml().nvmlDeviceGetPowerUsage(self._handle) * MW_TO_W
        except Exception:
            return None

    @contextlib.contextmanager
    def window(self, min_window_s: float = MIN_WINDOW_S) -> Iterator[_OpenWindow]:
        """Energy from entering to leaving the block; the result is ``.result`` of the yielded object.

        Synchronise the GPU inside the block: work still queued when it closes is not counted.
        """
        w = _OpenWindow()
        if not self.available:
            t0 = time.perf_counter()
            yield w
            w.result = EnergyWindow(None, time.perf_counter() - t0, False, f"no energy counter: {self.reason}")
            return
        e0, t0 = self.energy_mj(), time.perf_counter()
        yield w
        e1, t1 = self.energy_mj(), time.perf_counter()
        seconds = t1 - t0
        if e1 < e0:  # the counter went back (the driver reloaded): no energy can be read off this window
            w.result = EnergyWindow(None, seconds, False, f"NVML's energy counter went back from {e0} to {e1} mJ "
                                    "during the window (driver reloaded?): energy not measured")
        elif seconds < min_window_s:
            w.result = EnergyWindow(
                (e1 - e0) * MJ_TO_J,
                seconds,
                False,
                f"window of {seconds * 1e3:.1f} ms is shorter than {min_window_s:.2f} s: "
                "NVML's energy counter updates every 10-100 ms, so this is mostly noise",
            )
        else:
            w.result = EnergyWindow((e1 - e0) * MJ_TO_J, seconds, True)


class _OpenWindow:
    """What ``EnergyMeter.window`` yields: ``result`` is filled in when the block closes."""

    result: EnergyWindow | None = None


_meters: dict[int, EnergyMeter] = {}
_idle_w: dict[int, float | None] = {}


def meter_for(device: Any) -> EnergyMeter | None:
    """The (cached) meter of a CUDA :class:`~tilestack.perf.device.Device`; None for a CPU."""
    if getattr(device, "kind", str(device)) != "cuda":
        return None
    index = getattr(device, "index", 0)
    if index not in _meters:
        _meters[index] = EnergyMeter(index, _pci_bus_id(index))
    return _meters[index]


def _pci_bus_id(cuda_index: int) -> str | None:
    """NVML's bus id (``"00000000:19:00.0"``) of torch's ``cuda:<index>``, or None where torch does not say."""
    try:
        import torch

        props = torch.cuda.get_device_properties(cuda_index)
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except Exception:  # older torch without the pci_* fields, or no CUDA
        return None


def idle_power_w(meter: EnergyMeter, seconds: float = MIN_WINDOW_S) -> float | None:
    """The GPU's power while nothing runs, over one window (measured once per process and meter)."""
    if meter.index not in _idle_w:
        if not meter.available:
            return None
        with meter.window(seconds) as w:
            time.sleep(seconds)
        _idle_w[meter.index] = w.result.avg_power_w if w.result and w.result.valid else None
    return _idle_w[meter.index]


def measure_energy(
    fn: Callable[..., Any],
    *,
    args_sets: Sequence[tuple] | None,
    per_call_s: float,
    meter: EnergyMeter | None,
    min_window_s: float = MIN_WINDOW_S,
    sync: Callable[[], None] | None = None,
    idle: bool = False,
    calls_per_invocation: int = 1,
) -> EnergySample:
    """Run ``fn`` back to back for at least ``min_window_s`` and read the energy it took.

    ``per_call_s`` (the timed median) sizes the chunks of calls between clock reads. ``sync`` waits for the device
    (``torch.cuda.synchronize``); ``idle`` also measures the idle power once per process. A ``fn`` that
    launches several calls at once (a CUDA-graph replay) says how many in ``calls_per_invocation``.
    """
    sets = [()] if args_sets is None else list(args_sets)
    if meter is None or not meter.available:
        why = meter.reason if meter is not None else "not a CUDA device"
        return EnergySample(EnergyWindow(None, 0.0, False, f"no energy counter: {why}"), 0)
    # Calls go in chunks of about CHUNK_S of (timed) work until the host has spent the window; a host that
    # runs ahead of the GPU blocks once the launch queue is full, so the window tracks the GPU's time.
    chunk = int(min(MAX_ENERGY_CALLS, max(1, CHUNK_S / max(per_call_s * calls_per_invocation, 1e-9))))
    calls = 0
    if sync:
        sync()
    # Idle first (once per process), while the GPU is as cool as it will be in this process.
    idle_w = idle_power_w(meter) if idle else None
    with meter.window(min_window_s) as w:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < min_window_s * WINDOW_MARGIN and calls < MAX_ENERGY_CALLS:
            for i in range(chunk):
                fn(*sets[(calls + i) % len(sets)])
            calls += chunk
        if sync:
            sync()
    return EnergySample(w.result, calls * calls_per_invocation, idle_w)
