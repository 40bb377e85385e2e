"""Rank functions for tests/test_bad_inputs_round13.py (importable by the spawned ranks: tests/ is on the path)."""

from __future__ import annotations

from tilestack.parallel import GPT, TINY, ParallelConfig, Trainer, make_batch


def bad_token_in_one_rank(rank: int, world_size: int, where: str) -> tuple[str, str, bool]:
    """One data-parallel step whose global batch holds a token id past the vocabulary in the last rank's rows only;
    (error type, message, whether this rank's parameters are unchanged)."""
    pc = ParallelConfig(dp=world_size)
    trainer = Trainer(GPT(TINY, seed=0), pc, pc.build_mesh("cpu"))
    idx, targets = make_batch(TINY, batch=2 * world_size, seq=8)
    (idx if where == "idx" else targets)[-1, 3] = TINY.vocab       # the last rank's rows
    before = trainer.full_params()
    try:
        trainer.step(idx, targets)
        outcome = ("ok", "")
    except Exception as e:  # noqa: BLE001 - the test reads which error each rank saw
        outcome = (type(e).__name__, str(e))
    after = trainer.full_params()
    return (*outcome, all(before[k].equal(after[k]) for k in before))


def batch_refusals(rank: int, world_size: int) -> list[tuple[str, str, str, bool]]:
    """Trainer.step on one rank with each bad global batch: (case, error type, message, parameters unchanged)."""
    import torch

    pc = ParallelConfig()
    trainer = Trainer(GPT(TINY, seed=0), pc, pc.build_mesh("cpu"))
    idx, targets = make_batch(TINY, batch=2, seq=8)
    cases = {
        "idx float": (idx.float(), targets),
        "idx bool": (idx > 3, targets),
        "targets int32": (idx, targets.int()),
        "idx numpy": (idx.numpy(), targets),
        "targets list": (idx, targets.tolist()),
        "idx 1-d": (idx[0], targets[0]),
        "idx 3-d": (idx[None], targets[None]),
        "no rows": (idx[:0], targets[:0]),
        "no tokens": (idx[:, :0], targets[:, :0]),
        "shapes differ": (idx, targets[:, :4]),
        "idx meta": (idx.to("meta"), targets),
        "idx -1": (torch.full_like(idx, -1), targets),
        "idx vocab": (torch.full_like(idx, TINY.vocab), targets),
        "targets -1": (idx, torch.full_like(targets, -1)),
        "targets vocab": (idx, torch.where(targets == targets[1, 5], TINY.vocab, targets)),
    }
    out = []
    for case, (i, t) in cases.items():
        before = trainer.full_params()
        try:
            trainer.step(i, t)
            outcome = ("ok", "")
        except Exception as e:  # noqa: BLE001 - the test reads the error
            outcome = (type(e).__name__, str(e))
        after = trainer.full_params()
        out.append((case, *outcome, all(before[k].equal(after[k]) for k in before)))
    # what stays accepted: int32 ids, a flipped (negative-stride-like) view, targets ignored with -100
    ignored = targets.clone()
    ignored[:, :4] = -100
    for case, (i, t) in {"idx int32": (idx.int(), targets), "idx flipped": (idx.flip(1), targets.flip(1)),
                         "targets -100": (idx, ignored)}.items():
        out.append((case, "ok", repr(trainer.step(i, t)), False))
    return out
