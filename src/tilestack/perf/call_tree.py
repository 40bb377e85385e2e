"""The CPU call tree of a finished torch.profiler session, built from its raw (Kineto) events.

    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    for e in call_tree.cpu_events(prof):     # what prof.events() gives for CPU events, for the fields read here:
        e.name, e.input_shapes, e.cpu_parent, e.cpu_children, e.time_range.start, e.self_cpu_time_total

Why not ``prof.events()``: it builds a FunctionEvent per event (memory records matched, stacks filtered, names
interned) and its tree in Python, about 0.24 ms an event on this CPU: 4.8 s for the 20,000 events of a step of 4,000
small ops, seven times what the step's counting pass costs. Reading the few fields used here off the raw events takes
a tenth of that. The nesting is torch's own (``EventList._populate_cpu_children``): per thread, events sorted by start
and then longest first, each the child of the nearest open event that contains it; async events (ending on another
thread), torch's utility events (``_filter_name``) and an op's redispatch to itself are left out as
``prof.events()`` leaves them out. CPU events
only: a GPU kernel's time needs torch's correlation of kernels with their launches, so the GPU path keeps
``prof.events()``.
"""

from __future__ import annotations

import itertools
from typing import Any

NS_PER_US = 1e3


class TimeRange:
    """An event's interval in microseconds from the trace's start, as FunctionEvent's ``time_range``."""

    __slots__ = ("start", "end")

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end

    def elapsed_us(self) -> float:
        return self.end - self.start


class Event:
    """One CPU event: its name (``ProfilerStep#3`` as ``ProfilerStep*``, as prof.events() names it), input shapes
    (lists of ints, as ``record_shapes`` recorded them) and dtypes (the profiler's names: ``"c10::BFloat16"``),
    interval, thread and place in the tree."""

    __slots__ = ("name", "input_shapes", "input_dtypes", "time_range", "thread", "device_type", "cpu_parent",
                 "cpu_children")

    def __init__(self, name: str, input_shapes: list, time_range: TimeRange, thread: int, device_type: Any,
                 input_dtypes: list = ()):
        self.name, self.input_shapes, self.time_range = name, input_shapes, time_range
        self.input_dtypes = input_dtypes
        self.thread, self.device_type = thread, device_type
        self.cpu_parent: Event | None = None
        self.cpu_children: list[Event] = []

    @property
    def self_cpu_time_total(self) -> float:
        """Microseconds in this event and not in a child, as FunctionEvent's."""
        return self.time_range.elapsed_us() - sum(c.time_range.elapsed_us() for c in self.cpu_children)

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.input_shapes}, {self.time_range.start:.3f}-{self.time_range.end:.3f} us)"


def cpu_events(prof: Any) -> list[Event]:
    """The CPU events of a finished ``torch.profiler.profile`` session, each with its parent and children."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import _filter_name

    raw = prof.profiler.kineto_results.events()
    trace_start = prof.profiler.kineto_results.trace_start_ns()
    out: list[Event] = []
    for k in raw:
        if k.device_type() != DeviceType.CPU or k.is_async() or k.start_thread_id() != k.end_thread_id():
            continue
        name = k.name()
        if _filter_name(name) or getattr(k, "is_hidden_event", lambda: False)():
            continue
        if name.startswith("ProfilerStep#"):
            name = "ProfilerStep*"
        span = TimeRange((k.start_ns() - trace_start) / NS_PER_US, (k.end_ns() - trace_start) / NS_PER_US)
        out.append(Event(name, k.shapes(), span, k.start_thread_id(), DeviceType.CPU, k.dtypes()))
    for _, thread in itertools.groupby(sorted(out, key=lambda e: e.thread), key=lambda e: e.thread):
        open_: list[Event] = []       # each inside every one below it
        for e in sorted(thread, key=lambda e: (e.time_range.start, -e.time_range.end)):
            while open_:
                parent = open_[-1]
                if e.time_range.start >= parent.time_range.end or e.time_range.end > parent.time_range.end:
                    open_.pop()       # ended before e, or overlaps it only in part: no parent of e
                else:
                    parent.cpu_children.append(e)
                    e.cpu_parent = parent
                    break
            open_.append(e)
    return _without_redispatches(out)


def _without_redispatches(events: list[Event]) -> list[Event]:
    """``events`` less each that is its parent's only child of the parent's own name (``aten::sum`` redispatched
    to itself), its children lifted to the parent: EventList._remove_dup_nodes, which prof.events() applies."""
    while True:
        dup = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == e.name
               and len(e.cpu_parent.cpu_children) == 1]
        if not dup:
            return events
        for e in dup:
            parent = e.cpu_parent
            parent.cpu_children = e.cpu_children
            for c in e.cpu_children:
                c.cpu_parent = parent
        gone = {id(e) for e in dup}
        events = [e for e in events if id(e) not in gone]
