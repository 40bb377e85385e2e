"""Hash of the generated Triton and Gluon source of every library tuning problem's kernel at its default config
(traced only, nothing launched; the small CPU problems): run it at two commits and diff the outputs to see whether a
change to the IR or a backend altered any library kernel's code.

    PYTHONPATH=src python3 scripts/library_source_hashes.py > new.txt     # then the same at the other commit, diff
"""

from __future__ import annotations

import hashlib

from tilestack.tune.library import library_problems


def main() -> None:
    out: dict[str, str] = {}
    for problem in library_problems(small=True):
        for p in (problem, *problem.variants):
            try:
                traced = p.tile.trace(*p.make("cpu").args, **p.fixed, **p.default)
            except Exception as e:                      # a variant with no CPU trace at its default: say so
                out[p.name] = f"not traced: {type(e).__name__}"
                continue
            for backend in ("triton", "gluon"):
                try:
                    out[f"{p.name} [{backend}]"] = hashlib.sha1(traced.source(backend).encode()).hexdigest()[:12]
                except Exception as e:                  # (Gluon refuses some tiny configs by design)
                    out[f"{p.name} [{backend}]"] = f"no source: {type(e).__name__}"
    for name in sorted(out):
        print(name, out[name])


if __name__ == "__main__":
    main()
