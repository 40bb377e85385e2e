"""How good the cost model is, on stored measurements (``collect_ground_truth.py``): no GPU needed.

    .venv/bin/python scripts/tune/evaluate_cost_model.py --holdout pair \
        --out docs/results/cost_model_eval_h200_pair.json          # the H200's ground truth; --data for another

For each (kernel, shape) problem whose kept configs were all measured, with the model pre-trained without it:
``--holdout pair`` (the default, the issue's protocol: every other (kernel, shape) pair, other shapes of the same
kernel included, as a user tuning a new shape has them) or ``--holdout kernel`` (none of the kernel's problems:
a kernel the data has never seen, the harder case). The budget is at most ``--budget-frac`` of the kept
configs (rounded down, at least 1).
  ranking   Spearman between predicted and measured times over the kept configs; top-1 regret (the predicted
            best's time over the measured best, minus 1); top-5 regret
  search    at a budget of --budget-frac of the kept configs (at least 1), the best found over the exhaustive best
            (1.0 = found it), for: active learning by expected improvement (``tune.cost_model.active_search``),
            the model's top-k, random search (mean over --random-seeds), Triton-style exhaustive autotune in the
            space's product order cut at the same budget, active learning seeded with the H100 table's
            entry where one exists (measured first where the table tuned it for this problem's bucket; an entry
            of the nearest other bucket only where the model does not rank its own pick clearly faster), the
            same with the entry always first (the rule before), the kernel's default always first then active
            learning (the rule before --trust), and "the tuner": the H100 entry as above; where there is none,
            the kernel's default, unless the model pre-trained without the problem ranks its own pick clearly
            faster (more than --trust on the mean over trees, and faster in most trees:
            ``tune.cost_model.first_seeds``); then active learning; and how many measurements each needs to come
            within 5% of the best, and (seeded and unseeded active learning) within 2%
  time      tuning wall time: the measured configs' compile + first launch + timing, plus the model's own time
The last lines are tables: per problem, and the medians / worst case against the bar (98% of the best at 10% of
the measurements, worst case 95%).
``--seed`` sets the forests' random seed (bootstrap and the features tried at each split): with budgets of one to
a few measurements the worst case moves with it, so run a few seeds before reading a difference.
"""

from __future__ import annotations

import argparse
import glob
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tilestack.tune.cost_model import TRUST, CostModel, Dataset, active_search

MIN_CONFIGS = 6          # problems with fewer measured kept configs are not worth ranking
NEAR = 1.05              # "within 5% of the best"
BAR = 0.98               # the bar: 98% of the exhaustive best
AL_STEPS = 30           # active learning runs this far (or 3x the budget) to count measurements to within 5%
TIMING_S = 0.05          # per measured config beyond its first launch (do_bench's 20 ms rep and warm-up)
GPU_TRUTH = "docs/results/tune_ground_truth_h200.jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", help="JSON lines (repeatable; globs); default the H200's, "
                    f"{GPU_TRUTH} (not the interpreter's: CPU wall times rank configs otherwise, and its problem ids "
                    "are the GPU's)")
    ap.add_argument("--budget-frac", type=float, default=0.10)
    ap.add_argument("--holdout", default="pair", choices=("pair", "kernel"),
                    help="what the model is pre-trained without: the problem (pair) or its whole kernel")
    ap.add_argument("--random-seeds", type=int, default=20)
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="the forests' random seed (their bootstrap and split "
                    "features; the search is deterministic given it): run a few to see how much is luck")
    ap.add_argument("--seed-device", default="nvidia-h100-80gb-hbm3", help="tables whose winners seed the search")
    ap.add_argument("--trust", type=float, default=TRUST, help="the predicted gain (log2) for which the model's "
                    "pick goes before an untuned default (tune.cost_model.first_seeds)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    paths = sorted({p for pat in (a.data or [GPU_TRUTH]) for p in glob.glob(pat)})
    if not paths:
        print("no data: run scripts/tune/collect_ground_truth.py first")
        return 2
    data = Dataset.load(paths)
    rows = []
    for p in data.problems.values():
        kept = p.kept()
        ok = [i for i in kept if p.us[i] is not None]
        if not p.complete or len(ok) < MIN_CONFIGS:
            continue
        rows.append(evaluate(p, data, a))
        r = rows[-1]
        print(f"{r['id'][:58]:58} n={r['n']:4} rho={r['spearman']:+.2f} top1={r['top1_regret']:.3f} "
              f"AL={r['al_frac']:.3f} rand={r['random_frac']:.3f} triton={r['triton_frac']:.3f}", flush=True)
    if not rows:
        print(f"no problem in {paths} has all its kept configs measured (at least {MIN_CONFIGS} that ran)")
        return 2
    summary = summarize(rows)
    if a.out:
        from tilestack.tune.cache import write_json_atomic
        write_json_atomic(a.out, {"data": paths, "budget_frac": a.budget_frac, "holdout": a.holdout, "trust": a.trust,
                                  "seed": a.seed, "problems": rows, "summary": summary})
    print_tables(rows, summary, a.budget_frac, a.holdout, [data.problems[r["id"]].meta.get("timer", "") for r in rows])
    return 0


def evaluate(p, data: Dataset, a) -> dict:
    kept = p.kept()
    X = p.X(kept, aot=False)          # what a tuner knows before compiling anything
    us = np.array([math.inf if p.us[i] is None else p.us[i] for i in kept])
    best = float(us.min())
    n = len(kept)
    budget = max(1, math.floor(a.budget_frac * n + 1e-9))      # at most the fraction
    held = dict(exclude_kernel=p.kernel) if a.holdout == "kernel" else dict(exclude=[p.id])
    prior = data.training(**held, aot=False)
    t0 = time.perf_counter()
    model = CostModel(a.trees, a.seed).fit(*prior) if prior[0] else None
    fit_s = time.perf_counter() - t0
    out = {"id": p.id, "kernel": p.kernel, "n": n, "valid": int(np.isfinite(us).sum()), "budget": budget,
           "best_us": best, "prior_rows": len(prior[0])}
    # ranking over the configs that ran
    ran = np.isfinite(us)
    if model is not None:
        mean, _ = model.predict(X)
        out["spearman"] = spearman(mean[ran], us[ran])
        order = np.argsort(mean)
        out["top1_regret"] = float(us[order[0]] / best - 1)
        out["top5_regret"] = float(us[order[:5]].min() / best - 1)
        out["topk_frac"] = best / float(us[order[:budget]].min())
        out["topk_to_5pct"] = first_within(list(order), us, best)
    else:
        out.update(spearman=float("nan"), top1_regret=float("nan"), top5_regret=float("nan"), topk_frac=0.0,
                   topk_to_5pct=n)
    # ranking with the compiler's report among the features (where the data has one: GPU runs)
    prior_aot = data.training(**held, aot=True)
    if prior_aot[0] and any(p.features[i].get("has_aot") for i in kept):
        mean_aot, _ = CostModel(a.trees, a.seed).fit(*prior_aot).predict(p.X(kept, aot=True))
        out["spearman_aot"] = spearman(mean_aot[ran], us[ran])
        out["top1_regret_aot"] = float(us[np.argmin(mean_aot)] / best - 1)

    def measure(i):
        return None if not np.isfinite(us[i]) else math.log2(us[i]) - p.features[kept[i]].get("log2_roofline_us", 0)

    # active learning: run to the whole space so that "measurements to 5%" is known, read off at the budget
    t0 = time.perf_counter()
    steps = active_search(X, measure, budget=min(n, max(3 * budget, AL_STEPS)), prior=prior if prior[0] else None,
                          n_trees=a.trees, seed=a.seed)
    al_s = time.perf_counter() - t0
    al_order = [s.index for s in steps]
    out["al_frac"] = best / float(us[al_order[:budget]].min())
    out["al_to_5pct"] = first_within(al_order, us, best)
    out["al_to_98"] = first_within(al_order, us, best, 1 / BAR)
    out["al_model_s"] = al_s * budget / max(len(steps), 1)
    # seeded by another GPU's table
    # the other GPU's winner for this bucket is measured first; its entry for the nearest other bucket (the
    # lookup's fallback) is a prior that goes first only where the model does not rank its own pick clearly
    # faster (cost_model.first_seeds)
    seed, same_bucket = seed_index(p, kept, a.seed_device)
    out["h100_seed"] = seed is not None
    out["h100_same_bucket"] = same_bucket
    if seed is not None:
        how = dict(seeds=[seed]) if same_bucket else dict(priors=[seed])
        st = active_search(X, measure, budget=min(n, max(2 * budget, AL_STEPS)), prior=prior if prior[0] else None,
                           trust=a.trust, n_trees=a.trees, seed=a.seed, **how)
        seeded = [s.index for s in st]
        out["seeded_frac"] = best / float(us[seeded[:budget]].min())
        out["seeded_to_5pct"] = first_within(seeded, us, best)
        out["seeded_to_98"] = first_within(seeded, us, best, 1 / BAR)
        out["seed_measured_first"] = seeded[0] == seed
        # the rule before: the other GPU's entry always measured first, whatever its bucket (at the budget only)
        st = active_search(X, measure, budget=budget, prior=prior if prior[0] else None, seeds=[seed],
                           n_trees=a.trees, seed=a.seed)
        out["seed_forced_frac"] = best / float(us[[s.index for s in st]].min())
        out["seed_alone_frac"] = best / float(us[seed]) if np.isfinite(us[seed]) else 0.0
    # the tuner: `tilestack tune --model` measures another device's table entry (the H100's) and, where no table
    # gives one, the kernel's default first, unless the model ranks its own pick clearly faster
    # (cost_model.first_seeds, --trust); then it searches by active learning
    default = default_index(p, kept)
    if seed is not None:
        out["tuner_frac"], out["tuner_to_5pct"] = out["seeded_frac"], out["seeded_to_5pct"]
        out["tuner_seed"] = "table" if out["seed_measured_first"] else "model"
    else:
        st = active_search(X, measure, budget=min(n, max(2 * budget, AL_STEPS)), prior=prior if prior[0] else None,
                           default=default, trust=a.trust, n_trees=a.trees, seed=a.seed)
        order = [s.index for s in st]
        out["tuner_frac"] = best / float(us[order[:budget]].min())
        out["tuner_to_5pct"] = first_within(order, us, best)
        out["tuner_seed"] = "default" if default is not None and order[0] == default else "model"
    if seed is None and default is not None:     # the rule before --trust: the default always first
        st = active_search(X, measure, budget=budget, prior=prior if prior[0] else None, seeds=[default],
                           n_trees=a.trees, seed=a.seed)
        out["default_first_frac"] = best / float(us[[s.index for s in st]].min())
        out["default_alone_frac"] = best / float(us[default]) if np.isfinite(us[default]) else 0.0
    else:
        out["default_first_frac"] = out["tuner_frac"]
    # random search, averaged
    rng = np.random.default_rng(0)
    fr, to5 = [], []
    for _ in range(a.random_seeds):
        perm = list(rng.permutation(n))
        fr.append(best / float(us[perm[:budget]].min()))
        to5.append(first_within(perm, us, best))
    out["random_frac"], out["random_to_5pct"] = float(np.mean(fr)), float(np.mean(to5))
    # Triton-style autotune: the configs in the space's product order, cut at the budget
    triton = list(np.argsort([p.raw_index[i] for i in kept], kind="stable"))
    out["triton_frac"] = best / float(us[triton[:budget]].min())
    out["triton_to_5pct"] = first_within(triton, us, best)
    # tuning wall time: exhaustive vs active learning at the budget
    cost = [config_seconds(p, i) for i in kept]
    out["exhaustive_s"] = float(sum(cost))
    out["al_s"] = float(sum(cost[i] for i in al_order[:budget]) + out["al_model_s"] + fit_s)
    return out


def config_seconds(p, i) -> float:
    """What measuring config i cost: its compile and first launch (recorded), plus timing."""
    return (p.first_s[i] or 0.0) + TIMING_S


def first_within(order, us, best, near: float = NEAR) -> int:
    """How many measurements, in this order, until one is within ``near`` x the best (5%; the whole space if not
    within the order given: as many as an exhaustive search)."""
    for k, i in enumerate(order):
        if us[i] <= near * best:
            return k + 1
    return len(us)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def seed_index(p, kept, device_slug: str) -> tuple[int | None, bool]:
    """(the index into ``kept`` of the config another GPU's shipped table gives this problem, if it is among the
    kept configs; whether the table tuned it for this problem's bucket, not the nearest other bucket)."""
    from tilestack.tune.cache import TABLES, Table, key, launch_kwargs, lookup_entry

    signature, bucket = p.meta.get("signature", ""), int(p.meta.get("bucket") or 0)
    for path in TABLES.glob(f"{p.kernel}_*_{device_slug}.json"):
        table = Table.read(path)
        entry = table and lookup_entry(table.entries, p.kernel, signature, bucket)
        if entry:
            cfg = launch_kwargs(entry)
            for k, i in enumerate(kept):
                if all(p.configs[i].get(n) == v for n, v in cfg.items() if n in p.configs[i]):
                    return k, key(p.kernel, signature, bucket) in table.entries
    return None, False


def default_index(p, kept) -> int | None:
    """The index (into ``kept``) of the kernel's declared default config (the problem's ``default``; where it
    leaves a backend option unset, the first kept config that agrees on what it sets, in the space's order)."""
    default = p.meta.get("default") or {}
    if not default:
        return None
    match = [k for k, i in enumerate(kept) if all(p.configs[i].get(n) == v for n, v in default.items())]
    return min(match, key=lambda k: p.raw_index[kept[k]]) if match else None


def summarize(rows) -> dict:
    def med(k):
        vals = [r[k] for r in rows if k in r and not (isinstance(r[k], float) and math.isnan(r[k]))]
        return statistics.median(vals) if vals else float("nan")

    def worst(k):
        vals = [r[k] for r in rows if k in r]
        return min(vals) if vals else float("nan")

    s = {"problems": len(rows)}
    for k in ("spearman", "top1_regret", "top5_regret", "spearman_aot", "top1_regret_aot", "al_frac", "topk_frac",
              "random_frac", "triton_frac", "seeded_frac", "seed_alone_frac", "al_to_5pct", "topk_to_5pct",
              "random_to_5pct", "triton_to_5pct", "seeded_to_5pct", "exhaustive_s", "al_s", "tuner_frac",
              "tuner_to_5pct", "default_first_frac", "seed_forced_frac", "al_to_98", "seeded_to_98"):
        s[f"median_{k}"] = med(k)
    for k in ("al_frac", "topk_frac", "random_frac", "triton_frac", "seeded_frac", "tuner_frac", "default_first_frac",
              "seed_forced_frac"):
        s[f"worst_{k}"] = worst(k)
    s["bar_met"] = bool(s["median_tuner_frac"] >= 0.98 and s["worst_tuner_frac"] >= 0.95)
    return s


def print_tables(rows, s, frac, holdout, timers) -> None:
    print()
    print(f"{'problem':50} {'n':>4} {'bud':>4} {'rho':>6} {'top1':>6} {'tuner':>6} {'first':>7} {'AL':>6} "
          f"{'top-k':>6} {'rand':>6} {'triton':>6} {'H100':>6} | to5%: {'tuner':>5} {'AL':>4} {'rand':>5} "
          f"{'trit':>4} | {'exh s':>6} {'AL s':>6}")
    for r in rows:
        seeded = f"{r['seeded_frac']:.3f}" if "seeded_frac" in r else "-"
        print(f"{r['id'][:50]:50} {r['n']:>4} {r['budget']:>4} {r['spearman']:>6.2f} {r['top1_regret']:>6.3f} "
              f"{r['tuner_frac']:>6.3f} {r['tuner_seed'] or '-':>7} "
              f"{r['al_frac']:>6.3f} {r['topk_frac']:>6.3f} {r['random_frac']:>6.3f} {r['triton_frac']:>6.3f} "
              f"{seeded:>6} | {r['tuner_to_5pct']:>11} {r['al_to_5pct']:>4} {r['random_to_5pct']:>5.1f} "
              f"{r['triton_to_5pct']:>4} | "
              f"{r['exhaustive_s']:>6.1f} {r['al_s']:>6.1f}")
    print()
    print(f"{s['problems']} problems, each held out ({holdout}); budget at most {frac:.0%} of the kept configs; "
          "fraction of the exhaustive best found (median / worst):")
    for name, k in (("active learning (EI)", "al_frac"), ("model top-k", "topk_frac"),
                    ("random search", "random_frac"), ("Triton-style product order", "triton_frac"),
                    ("AL seeded by H100 tables", "seeded_frac"),
                    ("H100 entry always first (before)", "seed_forced_frac"),
                    ("untuned default always first", "default_first_frac"),
                    ("the tuner (seeded where it can)", "tuner_frac")):
        print(f"  {name:32} {s['median_' + k]:.3f} / {s['worst_' + k]:.4f}")
    print(f"  measurements to within 5% (median): tuner {s['median_tuner_to_5pct']}, AL {s['median_al_to_5pct']}, "
          f"AL seeded by H100 "
          f"{s['median_seeded_to_5pct']}, random {s['median_random_to_5pct']:.1f}, Triton order "
          f"{s['median_triton_to_5pct']}, model top-k {s['median_topk_to_5pct']}")
    seeded = [r for r in rows if "seeded_to_98" in r]
    if seeded:
        print(f"  the {len(seeded)} problems an H100 table seeds: measurements to 98% of the best, seeded / unseeded "
              f"active learning: median {statistics.median(r['seeded_to_98'] for r in seeded)} / "
              f"{statistics.median(r['al_to_98'] for r in seeded)}, total {sum(r['seeded_to_98'] for r in seeded)} / "
              f"{sum(r['al_to_98'] for r in seeded)}; the H100 winner measured first on "
              f"{sum(r['seed_measured_first'] for r in seeded)}")
    print(f"  ranking (held out: {holdout}): Spearman {s['median_spearman']:.2f}, top-1 regret "
          f"{s['median_top1_regret']:.3f}, top-5 regret {s['median_top5_regret']:.3f}; with the compiler's "
          f"report: Spearman {s['median_spearman_aot']:.2f}, top-1 regret {s['median_top1_regret_aot']:.3f}")
    print(f"  tuning wall time per problem (median): exhaustive {s['median_exhaustive_s']:.1f} s, "
          f"AL {s['median_al_s']:.1f} s")
    print(f"  bar for the tuner (median >= 0.98, worst >= 0.95 at {frac:.0%}): "
          f"{'met' if s['bar_met'] else 'NOT met'}")
    kinds = sorted(set(timers))
    print(f"  timer: {'; '.join(kinds)}")


if __name__ == "__main__":
    sys.exit(main())
