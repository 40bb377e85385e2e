"""Rendering of a model profile (``tilestack.perf.profile``), short accounts of its inputs, and loading the model a
command profiles.

    profile_render.print_profile(prof)                      # hot spots with tips, then the per-op table
    profile_render.profile_html(prof, "out/profile.html")   # one self-contained file with a roofline of the ops
    model, inputs = profile_render.load_target("examples/tiny.py:build")

Every name here is re-exported by ``tilestack.perf.profile``, where callers find them.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tilestack.perf.counting import ProfileError, Shapes

if TYPE_CHECKING:
    from tilestack.perf.profile import ModelProfile

HOT_SPOTS = 5  # ops listed, with tips, before the table
NOISY_STEP_REL_CI = 0.1  # a step time known worse than +-10% gets a note under the profile's heading
OTHER = "(other)"  # the row of time no op accounts for
UNKNOWN_FLOPS = "?"  # the FLOPs column of an op with no FLOP formula
DEFAULT_BUILDER = "build"
INPUTS_SHOWN = 4  # arguments shown when an error describes the inputs
REPR_CHARS = 60  # longer reprs are shown as their type


def shapes_text(shapes: Shapes) -> str:
    """``((2, 16, 8, 8), (16, 1, 3, 3))`` -> ``"2x16x8x8, 16x1x3x3"``; ``"-"`` for none."""
    return ", ".join("x".join(str(d) for d in s) for s in shapes) or "-"


def describe(value: Any) -> str:
    """A short account of an argument: ``(tensor 2x8 float32, 3)``, ``{'x': tensor 4 int64}``."""
    import torch

    if isinstance(value, torch.Tensor):
        try:
            shape = shapes_text((tuple(value.shape),)) if value.dim() else "scalar"
        except (RuntimeError, TypeError):
            shape = "nested"
        layout = "" if value.layout == torch.strided else f" {str(value.layout).removeprefix('torch.')}"
        return f"tensor {shape} {str(value.dtype).removeprefix('torch.')}{layout}"
    if isinstance(value, tuple | list):
        inner = ", ".join(describe(v) for v in value[:INPUTS_SHOWN]) + (", ..." if len(value) > INPUTS_SHOWN else "")
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(value.items())[:INPUTS_SHOWN]) + "}"
    text = repr(value)
    return text if len(text) <= REPR_CHARS else f"{type(value).__name__} object"


def error_text(e: BaseException) -> str:
    """``str(e)``, or where the exception's own ``__str__`` raises (a custom exception formatting attributes it lacks)
    its class and arguments: reporting a model's error must not raise an error of its own in its place."""
    try:
        return str(e)
    except Exception as inner:  # noqa: BLE001 - any failure of the model's __str__
        try:
            args = repr(e.args)
        except Exception:  # noqa: BLE001
            args = "(unprintable arguments)"
        return f"<{type(e).__name__} whose str() raised {type(inner).__name__}; args={args}>"


# --- loading a target ---------------------------------------------------------------------------------------
def load_target(target: str) -> tuple[Any, Any]:
    """``(model, inputs)`` from ``path/to/script.py[:fn]`` or ``package.module[:fn]``.

    ``fn`` (default ``build``) is called with no arguments and returns ``(model, inputs)``; without such a
    function the module's top-level ``model`` and ``inputs`` are used.
    """
    if not isinstance(target, str | Path) or not str(target):
        raise ProfileError(
            f"target={target!r} ({type(target).__name__}); expected 'path/to/script.py[:fn]' or 'package.module[:fn]'"
        )
    spec, _, fn_name = str(target).partition(":")
    try:
        is_file = Path(spec).is_file()
    except OSError as e:    # (a folder on its way this user cannot enter, a name too long: a bare traceback)
        raise ProfileError(f"target={target!r}: {spec!r} cannot be looked up ({e.strerror or e}); expected a .py "
                           "script this user can read, or a module path") from None
    if spec.endswith(".py") or is_file:
        path = Path(spec)
        if not is_file:
            raise ProfileError(f"target={target!r}: no file {path}; expected a .py script or a module path")
        mod_spec = importlib.util.spec_from_file_location(f"_tilestack_target_{path.stem}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ProfileError(f"target={target!r}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        # Registered while it runs, as an import would: dataclasses and pickling look their module up there.
        sys.modules[mod_spec.name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_spec.name, None)
            raise ProfileError(f"target={target!r} raised {type(e).__name__} while loading: {error_text(e)}") from e
        finally:
            sys.path.remove(str(path.parent.resolve()))
    else:
        try:
            module = importlib.import_module(spec)
        except (ImportError, ValueError, TypeError) as e:  # ":fn" (no module) and ".rel" raised bare (round 23)
            raise ProfileError(
                f"target={target!r}: cannot import module {spec!r} ({e}); expected a .py path "
                "or an importable module"
            ) from e
        except Exception as e:  # the module itself raised while it ran, as a script's load is reported
            raise ProfileError(f"target={target!r} raised {type(e).__name__} while loading: {error_text(e)}") from e
    fn = getattr(module, fn_name or DEFAULT_BUILDER, None)
    if fn is not None and not callable(fn):  # MODELS, a dict: calling it would say only "not callable"
        raise ProfileError(f"target={target!r}: {fn_name or DEFAULT_BUILDER} is not a function ({type(fn).__name__}); "
                           "expected a function taking no arguments that returns (model, inputs)")
    if fn is not None:
        try:
            built = fn()
        except Exception as e:
            raise ProfileError(
                f"target={target!r}: {fn_name or DEFAULT_BUILDER}() raised {type(e).__name__}: {error_text(e)}"
            ) from e
        if not (isinstance(built, tuple) and len(built) == 2):
            raise ProfileError(
                f"target={target!r}: {fn_name or DEFAULT_BUILDER}() returned {type(built).__name__}; "
                "expected a (model, inputs) pair"
            )
        if not callable(built[0]):  # a pair of tensors (a helper's (src, dst)): no model to run
            raise ProfileError(
                f"target={target!r}: {fn_name or DEFAULT_BUILDER}() returned ({describe(built[0])}, "
                f"{describe(built[1])}); expected (model, inputs) with the model first (an nn.Module or a callable)"
            )
        return built
    if fn_name:
        raise ProfileError(f"target={target!r}: the module has no function {fn_name!r}")
    if hasattr(module, "model") and hasattr(module, "inputs"):
        return module.model, module.inputs
    raise ProfileError(
        f"target={target!r}: expected a function {DEFAULT_BUILDER}() returning (model, inputs), "
        "or top-level variables `model` and `inputs`"
    )


# --- rendering ----------------------------------------------------------------------------------------------
PROFILE_COLUMNS = (
    "op",
    "input shapes",
    "calls/step",
    "time/step",
    "+-",
    "share",
    "FLOPs/step",
    "bytes/step",
    "FLOP/B",
    "bound",
    "% of roof",
    "FLOP/s",
)


def _check_profile(fn: str, p: Any, **counts: Any) -> None:
    """Refuse, by name, anything but a ModelProfile (a None where a profile was not kept failed deep inside with an
    AttributeError) and row counts that are not whole numbers >= 0 (a negative ``top`` cut rows off the end)."""
    from tilestack.perf.profile import ModelProfile

    if not isinstance(p, ModelProfile):
        raise ProfileError(f"{fn}: p={describe(p)} ({type(p).__name__}); expected a ModelProfile (what "
                           "profile_model returns)")
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ProfileError(f"{fn}: {name}={value!r} ({type(value).__name__}); expected an int >= 0 (rows shown)"
                               + (" or None (all)" if name == "top" else ""))


def _shown_ops(p: ModelProfile) -> dict[int, str]:
    """Each row's op as the table and the hot spots show it: tagged with its dtype (``aten::addmm [bf16]``) where
    another row holds the same op at the same shapes in another dtype (a bf16 and an fp32 Linear of one width get a
    row each), which would otherwise read as twins."""
    rows_at = collections.Counter((o.op, o.shapes) for o in p.ops)
    return {id(o): f"{o.op} [{o.m.dtype}]" if rows_at[o.op, o.shapes] > 1 else o.op for o in p.ops}


def profile_rows(p: ModelProfile) -> list[list[str]]:
    from tilestack.perf.report import pct, seconds, si, spread

    _check_profile("profile_rows", p)
    shown = _shown_ops(p)
    out = []
    for o in p.ops:
        out.append(
            [
                shown[id(o)],
                shapes_text(o.shapes),
                f"{o.calls:g}",
                seconds(o.total_s),
                spread(o.m.latency_rel_ci),
                pct(o.share),
                si(o.m.flops * o.calls, "FLOP") if o.flops_known else UNKNOWN_FLOPS,
                si(o.m.bytes * o.calls, "B"),
                f"{o.m.intensity:.3g}" if o.counted and o.flops_known else "-" if o.flops_known else UNKNOWN_FLOPS,
                o.bound,
                pct(o.roof_fraction),
                si(o.m.flops_per_s, "FLOP/s") if o.m.flops else "-",
            ]
        )
    return out


def notes(p: ModelProfile) -> list[str]:
    """What the totals leave out or where a row's time is not its own: uncounted FLOPs, untimed ops, no ops."""
    from tilestack.perf.report import si

    _check_profile("notes", p)
    out = []
    if p.unsupported:
        out.append(
            f"no FLOP formula for {', '.join(p.unsupported)}: their FLOPs are not in the totals (shown as "
            f"{UNKNOWN_FLOPS}); their bytes are"
        )
    if p.untimed:
        ops = ", ".join(sorted({u.op for u in p.untimed}))
        out.append(
            f"{len(p.untimed)} counted op(s) got no time of their own from the profiler ({ops}: "
            f"{si(math.fsum(u.flops for u in p.untimed), 'FLOP')}/step in the totals); their time is in another "
            f"row or {OTHER}"
        )
    if not p.ops:
        out.append("the step ran no ATen op: nothing to time")
    return out


def hot_spot_lines(p: ModelProfile, n: int = HOT_SPOTS) -> list[str]:
    from tilestack.perf.report import pct, seconds

    _check_profile("hot_spot_lines", p, n=n)
    shown = _shown_ops(p)
    return [
        f"{i + 1}. {shown[id(o)]}{f' ({shapes_text(o.shapes)})' if o.shapes else ''}: {pct(o.share)} of the step "
        f"({seconds(o.total_s)}), {o.tip}"
        for i, o in enumerate(p.hot_spots(n))
    ]


def print_profile(p: ModelProfile, con: Any = None, top: int | None = None) -> None:
    """Hot spots with tips first, then the per-op table (the ``top`` ops, all by default)."""
    from rich.table import Table

    from tilestack.perf.report import ceilings_line, console, escape, seconds, si
    from tilestack.perf.report import spread as show_spread

    _check_profile("print_profile", p, top=top)
    if con is not None and not callable(getattr(con, "print", None)):  # a str failed after the checks, deep in rich
        raise ProfileError(f"print_profile: con={describe(con)} ({type(con).__name__}); expected a rich Console (or "
                           "anything with a print method), or None for one on the terminal")
    con = console(con)
    mode = "forward + backward" if p.train else "its own step (it runs its backward)" if p.own_backward else "forward"
    spread = p.step_rel_ci
    con.print(
        f"[bold]{escape(p.name)}[/bold] on {escape(p.device.name)}: {mode}, {seconds(p.step_s)} of op time in the "
        f"median step ({escape(show_spread(spread))} over {p.steps} steps; {seconds(p.wall_s)} wall), "
        f"{si(p.flops, 'FLOP')} per step"
    )
    if spread is not None and spread > NOISY_STEP_REL_CI:
        con.print(
            f"[yellow]note: the step time is known only to {escape(show_spread(spread))} (95% interval of the median "
            f"over {p.steps} steps): every op's time is as uncertain; give it more --steps or --budget, or a "
            "quieter machine[/yellow]"
        )
    con.print(escape(ceilings_line(p.ceilings)))
    for line in notes(p):
        con.print(f"[yellow]note: {escape(line)}[/yellow]")
    con.print("[bold]hot spots[/bold]")
    for line in hot_spot_lines(p):
        con.print("  " + escape(line))
    t = Table(header_style="bold")
    for c in PROFILE_COLUMNS:
        t.add_column(c, overflow="fold")
    for r in profile_rows(p)[:top]:
        t.add_row(*(escape(c) for c in r))
    con.print(t)


def profile_html(p: ModelProfile, path: str | Path, png_path: str | Path | None = None) -> Path:
    """The profile as one self-contained HTML file, with a roofline of the counted ops."""
    from tilestack.perf import report

    _check_profile("profile_html", p)
    for name, value in (("path", path), ("png_path", png_path)):
        if value is None and name == "png_path":
            continue
        if not isinstance(value, str | Path) or Path(value).is_dir():
            kind = "a directory" if isinstance(value, str | Path) else type(value).__name__
            raise ProfileError(f"profile_html: {name}={value!r} ({kind}); expected a file path (str or Path)")
    counted = [o.m for o in p.ops if o.counted and o.m.flops > 0]
    png = report.roofline_png(
        counted, png_path, device=p.device, ceilings=p.ceilings, title=f"{p.name}: ops on {p.device.name}"
    )
    sections = [
        report.Section("hot spots", notes=notes(p) + hot_spot_lines(p)),
        report.Section(
            "roofline of the ops",
            png=png,
            notes=["each point is one ATen op, per call; solid: measured, dashed: published"],
        ),
        report.Section("ops", PROFILE_COLUMNS, profile_rows(p)),
        report.device_section(p.device, p.ceilings),
    ]
    return report.write_html(path, f"profile of {p.name}", sections)
