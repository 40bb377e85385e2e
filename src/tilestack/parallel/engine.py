"""One training loop for every parallel configuration.

    trainer = Trainer(GPT(cfg, seed=0), pc, mesh, lr=1e-3)
    for step in range(steps):
        loss = trainer.step(idx, targets)          # the global batch (B, N) on every rank; a float, the same on all

Every rank is given the whole global batch and takes its data-parallel slice (rows [k * B / D, (k + 1) * B / D)
for data-parallel index k = dp_rank * dp_shard + dp_shard_rank, D = dp * dp_shard), so the same arguments give
the same run on any layout. The loss is the mean over the global batch, so every layout's gradients equal the
single-process ones up to rounding. ``forward_backward`` and ``optimizer_step`` are the two halves of ``step``
(tests read the reduced gradients between them with ``full_grads``).

With ``gns=GradientNoiseScale()`` the Trainer measures the gradient noise scale online from the per-rank
gradients of plain data parallelism (Pollux): each rank's gradient, before the all-reduce, is a small batch of
B / dp samples, the reduced one the whole batch of B; the squared norms of both are all that is exchanged (one
scalar all-reduce per step). DDP's reduction is then done after the backward, not overlapped with it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tilestack.parallel.config import ParallelConfig, ParallelConfigError
from tilestack.parallel.model import GPT, lm_loss
from tilestack.parallel.parallelize import (
    all_reduce_gradients,
    local_grad,
    parallelize,
    trainer_reduces_gradients,
    uses_ddp,
)
from tilestack.parallel.zero import ZeroOptimizer


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def adamw_foreach(params: list[torch.Tensor]) -> bool | None:
    """AdamW's ``foreach`` for these parameters: torch's own choice (None: the multi-tensor kernels on a GPU, a
    loop on a CPU) where the list is all plain tensors or all DTensors, else False: the foreach kernels reject
    lists that mix them (tensor parallelism without sequence parallelism leaves the norms plain). On the H200 a
    loop over a 124M-parameter GPT's 148 tensors took about 20 ms of a 38 ms step (one launch per op)."""
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for p in params}
    return None if len(kinds) <= 1 else False


IGNORE_INDEX = -100   # F.cross_entropy's default: a target that takes no part in the loss
CLIP_EPS = 1e-6       # torch.nn.utils.clip_grad_norm_'s: max_norm / (norm + CLIP_EPS)


def check_batch(cfg, idx, targets) -> None:
    """ParallelConfigError, naming the argument, where the global batch (idx, targets) is not two integer (B, N)
    tensors of one shape, B and N >= 1, with token ids in [0, vocab) (targets may also be -100, ignored). Every rank
    holds the whole global batch and checks it, so all refuse it together, before any work: a bad token in one
    data-parallel rank's rows failed that rank alone, inside the embedding or the loss (a bare IndexError) while the
    others waited in the gradient all-reduce (gloo: "Connection closed by peer"; NCCL may wait until its timeout);
    a float, 1-d or 3-d batch failed inside torch, an empty one in a reshape ("ambiguous")."""
    for name, t, dtypes in (("idx", idx, (torch.int64, torch.int32)), ("targets", targets, (torch.int64,))):
        if not isinstance(t, torch.Tensor):
            raise ParallelConfigError(f"Trainer.step: {name} is {type(t).__name__}; expected a torch.Tensor of "
                                      "token ids, (B, N) int64 (make_batch makes one)")
        if t.dtype not in dtypes:
            raise ParallelConfigError(f"Trainer.step: {name} has dtype {t.dtype}; expected token ids of dtype "
                                      f"{' or '.join(map(str, dtypes))}")
        if t.dim() != 2 or 0 in t.shape:
            raise ParallelConfigError(f"Trainer.step: {name} has shape {tuple(t.shape)}; expected (B, N), B "
                                      "sequences of N tokens, both >= 1")
        if t.is_meta:
            raise ParallelConfigError(f"Trainer.step: {name} is a meta tensor, which holds no token ids; expected "
                                      "one on the CPU or the model's device")
    if targets.shape != idx.shape:
        raise ParallelConfigError(f"Trainer.step: targets has shape {tuple(targets.shape)} and idx "
                                  f"{tuple(idx.shape)}; expected one shape (the next token of each position)")
    for name, t in (("idx", idx), ("targets", targets)):
        lo, hi = (int(v) for v in torch.aminmax(t))      # (one pass; the rest only where something is wrong)
        if hi < cfg.vocab and lo >= 0:
            continue
        wrong = (t >= cfg.vocab) | (t < 0)
        if name == "targets":
            wrong &= t != IGNORE_INDEX
        if wrong.any():
            bad = t[wrong]
            also = f" or {IGNORE_INDEX} (ignored)" if name == "targets" else ""
            raise ParallelConfigError(f"Trainer.step: {name} holds token id {int(bad[0])}; expected ids in "
                                      f"[0, {cfg.vocab}) (the model's vocab){also}")


class Trainer:
    def __init__(self, model: GPT, pc: ParallelConfig, mesh, *, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), zero_bucket_numel: int = 1 << 22, gns=None):
        # (any other module failed on a missing .cfg, or deeper in a plan that addresses GPT's modules by name)
        if not isinstance(model, GPT):
            raise ParallelConfigError(f"Trainer: model is {type(model).__name__}; expected a tilestack.parallel.GPT "
                                      "(or a subclass): the parallel plans address its modules by name")
        if gns is not None and not uses_ddp(pc):
            raise ParallelConfigError(
                f"Trainer: gns needs each rank's whole gradient before the data-parallel reduction; got dp={pc.dp}, "
                f"dp_shard={pc.dp_shard}, tp={pc.tp}, pp={pc.pp}, zero={pc.zero}; expected plain data parallelism "
                "(dp > 1, dp_shard = tp = pp = 1, zero = 0), or accumulate_and_observe on one rank")
        self.gns = gns
        self.pc, self.mesh, self.cfg = pc, mesh, model.cfg
        self.device = next(model.parameters()).device
        self.pp_rank = mesh["pp"].get_local_rank()
        self.dp_index = mesh["dp"].get_local_rank() * pc.dp_shard + mesh["dp_shard"].get_local_rank()
        self.parts, self.stage_ids = parallelize(model, pc, mesh)
        self.params = [p for part in self.parts for p in part.parameters()]
        self._ddp_trains = self._training()         # the parameters DDP's buckets were built for
        self._zero_sat_out: set[str] = set()         # ZeRO's parameters frozen during some step

        def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                                     foreach=adamw_foreach(params))

        # ZeRO-2 reduce-scatters during backward unless a pipeline runs several backwards per step
        self.zero = ZeroOptimizer(self.params, mesh["dp"].get_group(), stage=pc.zero, make_optimizer=make,
                                  bucket_numel=zero_bucket_numel, overlap=pc.pp == 1) if pc.zero else None
        self.optimizer = self.zero.optimizer if self.zero else make(self.params)
        self._counted_per_shard: float | None = None       # (set by each step: _set_loss_scale)
        self._pieces = 1                                      # (likewise: chunks x micro-batches per rank)
        self._has_grads = False                               # reduced gradients waiting for optimizer_step
        self.schedule = self._pipeline_schedule() if pc.pp > 1 else None
        self._schedule_input: tuple | None = None          # (shape, dtype) of the rows the schedule was built for

    # ---- pipeline ------------------------------------------------------------------------------------------------
    def _pipeline_schedule(self):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )
        group = self.mesh["pp"].get_group()
        stages = [PipelineStage(part, s, self.pc.n_stages, self.device, group=group)
                  for part, s in zip(self.parts, self.stage_ids, strict=True)]
        # loss_fn: one micro-batch's share of the whole batch's mean (_loss divides by the number of pieces), so
        # the summed gradients are those of the mean. Not scale_grads: it divides all of p.grad after the step,
        # gradients accumulated by an earlier chunk of step(accumulate=k) included
        if self.pc.pp_schedule == "interleaved-1f1b":
            return ScheduleInterleaved1F1B(stages, self.pc.microbatches, loss_fn=self._loss, scale_grads=False)
        cls = ScheduleGPipe if self.pc.pp_schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], self.pc.microbatches, loss_fn=self._loss, scale_grads=False)

    # ---- one step ------------------------------------------------------------------------------------------------
    def local_batch(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global (B, N) batch."""
        n = idx.shape[0] // self.pc.dp_total
        rows = slice(self.dp_index * n, (self.dp_index + 1) * n)
        return idx[rows].to(self.device), targets[rows].to(self.device)

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor, *, accumulate: int = 1) -> float:
        """Loss and reduced gradients of the global batch (B, N); returns the global mean loss on every rank.

        ``accumulate=k`` (gradient accumulation): the batch's rows in k consecutive chunks of B / k, one forward
        and backward each (1/k of the activations alive), the gradients summed into those of the whole batch's
        mean: the same step as k = 1, up to rounding. The data-parallel reduction runs once, after the last chunk
        (DDP: no_sync before it), except where FSDP2 or ZeRO-2 reduce from backward hooks (they add up).
        Gradients of calls not followed by ``optimizer_step`` are summed, as ``loss.backward()`` sums them."""
        check_batch(self.cfg, idx, targets)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ParallelConfigError(f"Trainer.step: accumulate={accumulate!r}; expected a positive int (chunks "
                                      "of the batch whose gradients are summed)")
        if idx.shape[0] % accumulate:
            raise ParallelConfigError(f"Trainer.step: accumulate={accumulate} does not divide the batch of "
                                      f"{idx.shape[0]} sequences; expected batch % accumulate == 0 (equal chunks)")
        if accumulate > 1 and self.gns is not None:
            raise ParallelConfigError(f"Trainer.step: accumulate={accumulate} with gns; the noise scale is measured "
                                      "from one backward per rank: expected accumulate=1")
        rows = idx.shape[0] // accumulate
        try:
            self.pc.validate(self.mesh.size(), model=self.cfg, batch=rows, seq=idx.shape[1])
        except ParallelConfigError as e:
            if accumulate == 1:
                raise
            raise ParallelConfigError(f"{e} (Trainer.step: accumulate={accumulate} cuts the batch of "
                                      f"{idx.shape[0]} sequences into chunks of {rows})") from None
        self._follow_requires_grad()
        self._set_loss_scale(targets, accumulate)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for c in range(accumulate):
            chunk = slice(c * rows, (c + 1) * rows)
            loss += self._forward_backward_chunk(idx[chunk], targets[chunk], last=c == accumulate - 1)
        small_sq = self._squared_norm() if self.gns is not None else None
        self._reduce_gradients()
        self._average_buffers()
        if small_sq is not None:
            self._observe_noise(small_sq, rows // self.pc.dp_total)
        for dim in ("dp", "dp_shard"):                                     # mean over the data-parallel shards
            if self.mesh[dim].size() > 1:
                dist.all_reduce(loss, group=self.mesh[dim].get_group())
        self._has_grads = True
        return loss.item() / self.pc.dp_total

    def _average_buffers(self) -> None:
        """Floating-point buffers a forward updates (running statistics, as BatchNorm keeps) averaged over the
        data-parallel ranks, in one flat all-reduce: each rank saw only its rows, so the replicas drifted apart
        (FSDP2 and ZeRO kept each rank's own, DDP broadcast rank 0's before each forward, and a checkpoint kept
        rank 0's). The mean over equal shards of the rows is the whole batch's for statistics linear in the rows
        (a running mean). Nothing to do for GPT itself, which has no buffers."""
        from torch.distributed.tensor import DTensor

        bufs = [b for part in self.parts for b in part.buffers()
                if b.is_floating_point() and not isinstance(b, DTensor)]
        if not bufs or self.pc.dp_total == 1:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
        for dim in ("dp", "dp_shard"):
            if self.mesh[dim].size() > 1:
                dist.all_reduce(flat, group=self.mesh[dim].get_group())
        flat /= self.pc.dp_total
        with torch.no_grad():
            for b, new in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
                b.copy_(new.view_as(b))

    def _training(self) -> frozenset[str]:
        return frozenset(name for name, p in self.named_parts() if p.requires_grad)

    def _follow_requires_grad(self) -> None:
        """Parameters frozen or unfrozen (``requires_grad_``) since the Trainer was built, as one process allows
        between steps. DDP's buckets wait for the gradients of the parameters that trained when it was built (the
        next step failed: "Expected to have finished reduction"): it is built again for the new set, on every
        rank alike (each holds the same model). ZeRO's slices hold only the parameters that trained when it was
        built: one unfrozen since would never move, so it is refused by name."""
        if self.zero is not None:
            held = {id(p) for p in self.zero.params}
            late = [name for name, p in self.named_parts() if p.requires_grad and id(p) not in held]
            if late:
                raise ParallelConfigError(
                    f"Trainer.step: {', '.join(late[:3])} require grad but were frozen when the Trainer was built "
                    f"(zero={self.pc.zero}: its optimizer slices hold only the parameters that trained then); "
                    "expected them unfrozen before the Trainer is built (freezing later is allowed)")
            # one AdamW step count for the whole slice: a parameter that sat out steps frozen would come back with
            # the bias correction of the steps it missed (one process counts each parameter's own steps)
            back = [name for name, p in self.named_parts() if p.requires_grad and name in self._zero_sat_out]
            if back:
                raise ParallelConfigError(
                    f"Trainer.step: {', '.join(back[:3])} train again after steps frozen, with zero={self.pc.zero} "
                    "(one AdamW step count for its whole optimizer slice: their bias correction would count the "
                    "steps they missed); expected a parameter frozen under ZeRO to stay frozen, or zero=0 / dp_shard")
            self._zero_sat_out |= {name for name, p in self.named_parts() if id(p) in held and not p.requires_grad}
        if uses_ddp(self.pc) and (training := self._training()) != self._ddp_trains:
            from tilestack.parallel.parallelize import apply_ddp
            old = self.parts[0]
            # the old reducer's hooks on the parameters go now, not whenever the garbage collector frees it (each
            # backward would start its all-reduces too)
            getattr(old, "_remove_autograd_hooks", lambda: None)()
            self.parts[0] = apply_ddp(old.module, self.mesh["dp"].get_group(), comm=self.pc.dp_comm)
            self._ddp_trains = training

    def _forward_backward_chunk(self, idx: torch.Tensor, targets: torch.Tensor, *, last: bool) -> torch.Tensor:
        """Forward and backward of this rank's rows of one chunk (B', N) of the global batch; its summed loss
        shares (f64), before the data-parallel reduction."""
        idx, targets = self.local_batch(idx, targets)
        if self.schedule is None:
            # DDP all-reduces from the last chunk's backward only; measuring the noise scale it leaves the
            # gradients local, and _reduce_gradients reduces them
            ddp = uses_ddp(self.pc) and (self.gns is not None or not last)
            with self.parts[0].no_sync() if ddp else contextlib.nullcontext():
                loss = self._loss(self.parts[0](idx), targets)
                loss.backward()
            return loss.detach().double()
        first, final = 0 in self.stage_ids, self.pc.n_stages - 1 in self.stage_ids
        # torch's stages infer the shapes they send and receive on their first step and keep them: a later batch of
        # other rows or another sequence length was sent into buffers of the old size (the last stage failed on
        # the shape of its targets, the others waited for it). Every rank holds the whole batch, so all see the
        # change together and build new stages for the new shape.
        shape = (tuple(idx.shape), idx.dtype)
        if self._schedule_input is not None and shape != self._schedule_input:
            self.schedule = self._pipeline_schedule()
        self._schedule_input = shape
        losses: list[torch.Tensor] = []
        # return_outputs=False: the last stage keeps no micro-batch's logits past its backward (the losses
        # are all a step needs)
        self.schedule.step(*((idx,) if first else ()), target=targets if final else None,
                           losses=losses if final else None, return_outputs=False)
        # f64 on every stage: the last stage's loss has the model's dtype (f32, or f64), which the other
        # stages do not know, and the all-reduce needs one size on all
        loss = (torch.stack(losses).sum().detach().double() if final
                else torch.zeros((), dtype=torch.float64, device=self.device))
        dist.all_reduce(loss, group=self.mesh["pp"].get_group())           # only the last stage's is non-zero
        return loss

    def _set_loss_scale(self, targets: torch.Tensor, accumulate: int = 1) -> None:
        """The global batch's mean is over its targets that are not IGNORE_INDEX. Each piece a rank runs (one of
        ``accumulate`` chunks, or one of a pipeline's micro-batches of it) gives its mean over the pieces' count
        (the data-parallel average divides by the shards), which is the batch's mean only where every piece counts
        as many: where some are ignored, each piece's loss is its sum over the global count, times the number of
        data-parallel shards. Every rank holds the whole batch, so all agree on the count without a message."""
        counted = int((targets != IGNORE_INDEX).sum())
        if counted == 0:
            raise ParallelConfigError(f"Trainer.step: every target of the (B, N) = {tuple(targets.shape)} batch is "
                                      f"{IGNORE_INDEX} (ignored); expected at least one token to learn from (the "
                                      "mean over none is NaN, which would reach every parameter)")
        self._pieces = accumulate * (self.pc.microbatches if self.schedule is not None else 1)
        self._counted_per_shard = None if counted == targets.numel() else counted / self.pc.dp_total

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """This piece's part of the global mean loss, scaled as _set_loss_scale says."""
        if not isinstance(logits, torch.Tensor):       # (a subclass's forward returning a tuple or a dict)
            raise ParallelConfigError(f"Trainer.step: the model's forward returned {type(logits).__name__}; "
                                      "expected the logits, one (B, N, vocab) tensor, as GPT.forward returns")
        if self._counted_per_shard is None:         # nothing ignored: every piece counts as many
            loss = lm_loss(logits, targets)
            return loss if self._pieces == 1 else loss / self._pieces
        wide = torch.promote_types(logits.dtype, torch.float32)
        total = F.cross_entropy(logits.flatten(0, 1).to(wide), targets.flatten(), reduction="sum",
                                ignore_index=IGNORE_INDEX)
        return total / self._counted_per_shard

    def _squared_norm(self) -> torch.Tensor:
        """|g|^2 of this rank's whole gradient (f64; plain data parallelism: every parameter is whole here)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if p.grad is not None:
                total += p.grad.double().pow(2).sum()
        return total

    def _observe_noise(self, small_sq: torch.Tensor, local_rows: int) -> None:
        """Feed the noise scale: the mean over ranks of |g_b|^2 (b = this rank's rows) and |g_B|^2 of the reduced
        gradient (B = all ranks' rows)."""
        world = self.mesh["dp"].size()
        dist.all_reduce(small_sq, group=self.mesh["dp"].get_group())
        self.gns.update(float(small_sq) / world, float(self._squared_norm()), local_rows, local_rows * world)

    def _reduce_gradients(self) -> None:
        if self.zero is not None:
            self.zero.reduce_gradients()
        elif trainer_reduces_gradients(self.pc) or self.gns is not None:
            all_reduce_gradients(self.params, self.mesh["dp"].get_group(), comm=self.pc.dp_comm)
        # else DDP (unless measuring the noise scale) or FSDP2 reduced them during backward (or there is one
        # data-parallel rank)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Between ``forward_backward`` and ``optimizer_step``: scale the reduced gradients so that the L2 norm of
        the whole model's gradient is at most ``max_norm``; returns that norm before clipping, the same on every
        rank. It is ``torch.nn.utils.clip_grad_norm_`` of one process (coefficient max_norm / (norm + 1e-6)),
        whatever the layout: each element is counted once, summed over the ranks that hold distinct parts of it
        (tensor-parallel and FSDP2 shards, ZeRO slices, pipeline stages) and not over replicas. Calling torch's on
        ``trainer.params`` instead sees only this rank's shards and stages (each rank another norm)."""
        if (isinstance(max_norm, bool) or not isinstance(max_norm, int | float)
                or not 0 < max_norm < float("inf")):
            raise ParallelConfigError(f"Trainer.clip_grad_norm_: max_norm={max_norm!r}; expected a positive, "
                                      "finite number")
        if not self._has_grads:
            raise ParallelConfigError("Trainer.clip_grad_norm_: no reduced gradient; expected forward_backward(...) "
                                      "first (then optimizer_step)")
        norm = self._global_grad_norm()
        coef = max_norm / (norm + CLIP_EPS)
        if coef < 1:
            if self.zero is not None:
                self.zero.grad_shard.mul_(coef)
            else:
                for p in self.params:
                    if p.grad is not None:
                        local_grad(p).mul_(coef)
        return norm

    def _global_grad_norm(self) -> float:
        """The L2 norm of the whole model's reduced gradient, in f64 (see clip_grad_norm_)."""
        from torch.distributed.tensor import DTensor

        # squared sums keyed by the mesh dims over which their elements are split (summed over those groups)
        sums: dict[tuple[str, ...], torch.Tensor] = {}
        groups: dict[tuple[str, ...], list] = {}

        def add(p: torch.Tensor, sq: torch.Tensor, extra: tuple[tuple[str, object], ...] = ()) -> None:
            split = list(extra)
            if isinstance(p, DTensor):
                mesh = p.device_mesh
                # Shard, or FSDP2 x TP's _StridedShard (no Shard to is_shard()): anything not replicated is split
                split += [(mesh.mesh_dim_names[i], mesh.get_group(i))
                          for i, pl in enumerate(p.placements) if not pl.is_replicate()]
            key = tuple(name for name, _ in split)
            groups[key] = [g for _, g in split]
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=self.device)) + sq

        if self.zero is not None:
            shard = self.zero.grad_shard
            dp = (("dp", self.mesh["dp"].get_group()),)            # each rank holds its own slice
            for j, lo, hi in self.zero.shard_spans():
                add(self.zero.params[j], shard[lo:hi].double().pow(2).sum(), dp)
            for p in self.zero.params:                              # (every key on every rank of its groups)
                add(p, torch.zeros((), dtype=torch.float64, device=self.device), dp)
        else:
            for p in self.params:
                sq = (local_grad(p).double().pow(2).sum() if p.grad is not None
                      else torch.zeros((), dtype=torch.float64, device=self.device))
                add(p, sq)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for key in sorted(sums):                                    # one order on every rank
            for group in groups[key]:
                dist.all_reduce(sums[key], group=group)
            total += sums[key]
        if self.pc.pp > 1:                                          # each stage its own parameters
            dist.all_reduce(total, group=self.mesh["pp"].get_group())
        return float(total.sqrt())

    def optimizer_step(self) -> None:
        if self.zero is not None:
            self.zero.step()
            self.zero.zero_grad()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._has_grads = False

    def step(self, idx: torch.Tensor, targets: torch.Tensor, *, accumulate: int = 1) -> float:
        """One optimizer step on the global batch (B, N): ``forward_backward`` (``accumulate``: in that many
        chunks of rows, see there), then ``optimizer_step``; the global mean loss."""
        loss = self.forward_backward(idx, targets, accumulate=accumulate)
        self.optimizer_step()
        return loss

    # ---- whole tensors, for tests and checkpoints ----------------------------------------------------------------
    def named_parts(self) -> list[tuple[str, nn.Parameter]]:
        """(name in the full model, parameter) for every parameter this rank holds (DDP's ``module.`` dropped)."""
        return [(name.removeprefix("module."), p) for part in self.parts for name, p in part.named_parameters()]

    def full_params(self) -> dict[str, torch.Tensor]:
        """Whole parameters this rank's stages hold (gathered over tp and dp_shard), on the CPU."""
        return {name: _full(p.detach()).cpu().clone() for name, p in self.named_parts()}

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Whole reduced gradients (after forward_backward), on the CPU."""
        named = self.named_parts()
        if self.zero is not None:
            from torch.distributed.tensor import DTensor
            grads = self.zero.full_gradient()
            out = {}
            # ZeRO holds the parameters that trained when it was built (a frozen one has no place in its slices;
            # one frozen since has a slice, and no gradient: None, as under one process)
            names = {id(p): n for n, p in named}
            for p, g in zip(self.zero.params, grads, strict=True):
                name = names[id(p)]
                if not p.requires_grad:
                    continue
                if isinstance(p, DTensor):
                    g = DTensor.from_local(g, p.device_mesh, p.placements).full_tensor()
                out[name] = g.cpu().clone()
            return out
        return {name: _full(p.grad).cpu().clone() for name, p in named if p.grad is not None}


def _resume(trainer: Trainer, path: str, rank: int, progress: bool) -> int:
    """Load the checkpoint at ``path`` into ``trainer`` (every rank); the optimizer steps it holds. No whole
    checkpoint there (none saved yet, or the first save was cut short): step 0, with a warning."""
    import warnings
    from pathlib import Path

    from tilestack.parallel import checkpoint
    folder = Path(path)
    old = folder.with_name(f".{folder.name}.old")       # where a save cut between its renames left the last one
    if not any((f / ".metadata").is_file() for f in (folder, old)):
        if rank == 0:
            warnings.warn(f"tilestack train --resume: no whole checkpoint in {folder}; training from step 0",
                          stacklevel=2)
        return 0
    start = checkpoint.load(trainer, path)
    if progress and rank == 0:
        print(f"resumed from {path} at step {start}", flush=True)
    return start


def run_training(rank: int, world_size: int, spec: dict) -> dict:
    """One rank of a timed training run (what ``tilestack train`` and scripts/parallel/bench_scaling.py start on
    every rank). ``spec``: ``parallel`` (ParallelConfig keywords), ``model`` (ModelConfig keywords), ``batch``,
    ``seq``, ``steps``, ``warmup``, ``lr``, ``dtype`` ("float32" or "bfloat16"), ``device`` ("cpu" or "cuda"),
    ``progress`` (print a line per step on rank 0), ``noise_scale`` (measure the gradient noise scale from the
    per-rank gradients: plain data parallelism), ``checkpoint`` (a folder: the model and AdamW state saved there
    every ``save_every`` steps and after the last, by ``tilestack.parallel.checkpoint``), ``resume`` (start from
    the checkpoint in that folder where there is one: the steps it holds are skipped, and the run ends where an
    uninterrupted one would, batch ``s`` being ``make_batch(seed=s)`` either way). Returns ``start`` (the first
    step run), per-step losses and seconds of the steps run, tokens/s after warm-up (None if no step was timed),
    model FLOPs per token, the peak memory of this rank (bytes, CUDA only) and the noise scale after each step
    (``noise_scale``: None unless asked)."""
    import time

    from tilestack.parallel.model import ModelConfig, make_batch
    pc = ParallelConfig(**spec.get("parallel", {}))
    cfg = ModelConfig(**spec.get("model", {}))
    batch, seq, steps = spec["batch"], spec["seq"], spec["steps"]
    warmup = min(spec.get("warmup", 2), steps - 1)
    device = torch.device("cuda", torch.cuda.current_device()) if spec.get("device") == "cuda" else torch.device("cpu")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    pc.validate(world_size, model=cfg, batch=batch, seq=seq)
    model = GPT(cfg, seed=spec.get("seed", 0)).to(device=device, dtype=dtype)
    gns = None
    if spec.get("noise_scale"):
        from tilestack.parallel.plan.goodput import GradientNoiseScale
        gns = GradientNoiseScale()
    trainer = Trainer(model, pc, pc.build_mesh(device.type), lr=spec.get("lr", 1e-3), gns=gns)
    ckpt, save_every = spec.get("checkpoint"), spec.get("save_every") or 0
    start = _resume(trainer, ckpt, rank, spec.get("progress")) if ckpt and spec.get("resume") else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, seconds = [], []
    tokens = batch * seq
    for step in range(start, steps):
        idx, targets = make_batch(cfg, batch, seq, seed=step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(trainer.step(idx, targets))           # .item() inside: the step has finished
        seconds.append(time.perf_counter() - t0)
        if spec.get("progress") and rank == 0:
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  {tokens / seconds[-1]:,.0f} tokens/s", flush=True)
        if ckpt and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
            from tilestack.parallel import checkpoint
            checkpoint.save(trainer, ckpt)                  # whole or not at all: a kill keeps the previous one
    timed = seconds[min(warmup, max(0, len(seconds) - 1)):]
    return dict(start=start, losses=losses, seconds=seconds,
                tokens_per_s=tokens * len(timed) / sum(timed) if timed else None,
                flops_per_token=cfg.flops_per_token(seq), n_params=sum(p.numel() for p in model.parameters()),
                peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                noise_scale=[phi for _, phi in gns.history] if gns is not None else None)
