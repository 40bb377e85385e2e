"""Structural checks of the synchronization in a warp-specialized kernel's Gluon source (no GPU): what
tests/backends/test_gluon_attention_bwd_ws.py checks for the library's backward, for any kernel.

    check_sync(source, kernel_name, roles)     # raises AssertionError naming the line that breaks a rule

Rules, per partition function:
- a consumer's wait on a ring's ready barrier takes the stage's phase bit and flips it once, on the next line, then
  views the stage;
- each stage view is released exactly once (``mbarrier.arrive(<ring>_empty.index(<stage>))``), in the block that
  waited on it (not inside a loop nested in it), after every line that reads the view; after an asynchronous wgmma
  that reads it, only once a ``warpgroup_mma_wait(0`` (or a synchronous wgmma) has retired it. A view still read
  by a wgmma in flight at the trip's end is handed to a carried slot (``<ring>_busy_k = <stage>``) instead,
  released by an arrival right after a later ``warpgroup_mma_wait``;
- the producer waits for a stage to be freed (the empty barrier's phase, passing at once the first time), flips that
  phase, then expects the bytes on the stage's ready barrier and copies into that stage;
- every ring a consumer waits on is filled by the producer, and its empty barrier counts one arrival per consumer.
"""

import re

WAIT_READY = re.compile(r"mbarrier\.wait\((\w+)_ready\.index\((\w+)\), \(\1_rph >> \2\) & 1\)$")
VIEW = re.compile(r"(\w+) = (\w+)\.index\((\w+)\)(\.reshape\(\[[\d, ]+\]\))?$")
EXPECT = re.compile(r"mbarrier\.expect\((\w+)_ready\.index\((\w+)\), ")


def partitions(src: str, name: str, roles) -> dict[str, list[str]]:
    out = {}
    for role in roles:
        head = f"def {name}_{role}("
        assert head in src, f"no partition function for role {role}"
        out[role] = src.split(head)[1].split("@gluon.jit")[0].splitlines()[1:]
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], n: int) -> range:
    """The lines after ``n`` in the block of line ``n`` (nested lines included)."""
    d = _indent(lines[n])
    end = n + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= d):
        end += 1
    return range(n + 1, end)


def _code(line: str) -> str:
    return line.split("#")[0].strip()


def check_consumer(role: str, lines: list[str]) -> set[str]:
    """The rules for one consumer partition; returns the rings it waits on."""
    rings = set()
    for n, line in enumerate(lines):
        m = WAIT_READY.match(_code(line))
        if not m:
            assert "_rph" not in _code(line) or "_rph = 0" in line or re.match(r"\w+_rph = \w+_rph \^ \(1 << \w+\)$",
                                                                              _code(line)), (role, line)
            continue
        ring, stage = m.groups()
        rings.add(ring)
        assert _code(lines[n + 1]) == f"{ring}_rph = {ring}_rph ^ (1 << {stage})", (role, n, lines[n:n + 2])
        v = VIEW.match(_code(lines[n + 2]))
        assert v and v.group(2) == ring and v.group(3) == stage, (role, lines[n + 2])
        _check_release(role, lines, n + 2, v.group(1), ring, stage)
    return rings


def _check_release(role: str, lines: list[str], at: int, view: str, ring: str, stage: str) -> None:
    block = _block(lines, at)
    d = _indent(lines[at])
    word = re.compile(rf"\b{view}\b")
    frees = [n for n in block if _code(lines[n]) == f"mbarrier.arrive({ring}_empty.index({stage}))"]
    busy = [n for n in block if re.fullmatch(rf"{ring}_busy_\d+ = {stage}", _code(lines[n]))]
    where = (role, view, lines[at].strip())
    assert len(frees) + len(busy) == 1, (*where, "released", len(frees) + len(busy), "times")
    rel = (frees or busy)[0]
    assert _indent(lines[rel]) == d, (*where, "released inside a nested block:", lines[rel].strip())
    reads = [n for n in block if word.search(_code(lines[n]))]
    assert reads and reads[-1] < rel, (*where, "read after its release")
    asyncs = [n for n in reads if "warpgroup_mma(" in lines[n] and "is_async=True" in lines[n]]
    if frees and asyncs:
        retire = [n for n in range(asyncs[-1] + 1, rel) if "warpgroup_mma_wait(0" in lines[n]
                  or ("hopper.warpgroup_mma(" in lines[n] and "is_async" not in lines[n])]
        assert retire, (*where, "freed before its last async wgmma retired")
    if busy:
        var = _code(lines[rel]).split(" = ")[0]
        slot_frees = [n for n, x in enumerate(lines) if f"{ring}_empty.index({var})" in x]
        assert slot_frees, (*where, "carried, never freed")
        for n in slot_frees:
            k = n - 1
            while k >= 0 and "mbarrier.arrive(" in lines[k] and "_busy_" in lines[k]:
                k -= 1
            assert "warpgroup_mma_wait(" in lines[k], (*where, "carried slot freed with no wgmma wait before it")


def check_producer(role: str, lines: list[str]) -> set[str]:
    rings = set()
    for n, line in enumerate(lines):
        m = EXPECT.match(_code(line))
        if not m:
            continue
        ring, stage = m.groups()
        rings.add(ring)
        free = f"mbarrier.wait({ring}_empty.index({stage}), (({ring}_eph >> {stage}) & 1) ^ 1)"
        assert _code(lines[n - 2]) == free, (role, lines[n - 2:n + 1])
        assert _code(lines[n - 1]) == f"{ring}_eph = {ring}_eph ^ (1 << {stage})", (role, lines[n - 1])
        copy = _code(lines[n + 1])
        assert copy.startswith("tma.async_copy_global_to_shared(") and \
            copy.endswith(f"{ring}_ready.index({stage}), {ring}.index({stage}))"), (role, copy)
    return rings


def check_sync(src: str, name: str, roles, producer: str = "producer") -> None:
    parts = partitions(src, name, roles)
    filled = check_producer(producer, parts[producer])
    assert filled, "the producer fills no ring"
    waiters: dict[str, int] = {}
    for role, lines in parts.items():
        if role == producer:
            continue
        for ring in check_consumer(role, lines):
            waiters[ring] = waiters.get(ring, 0) + 1
    assert set(waiters) == filled, (sorted(waiters), sorted(filled))
    kernel = src.split(f"def {name}_kernel(")[1]
    for ring, count in waiters.items():
        assert f"mbarrier.init({ring}_empty.index(st), count={count})" in kernel, (ring, count)
