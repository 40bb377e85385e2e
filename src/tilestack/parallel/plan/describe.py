"""What the planner knows about a model: a sequence of layers, each with its parameters, FLOPs, activations and
boundary tensor, per sample (one sequence of ``seq`` tokens).

    desc = describe_gpt(ModelConfig(n_layer=4, d=128, n_head=4, vocab=256, max_seq=64), seq=64)
    desc = describe_transformer(n_layer=24, d=2048, n_head=16, vocab=50304, seq=2048, dtype_bytes=2)
    desc = describe_module(nn.Sequential(...), example_input)   # any model whose top-level children run in order

A layer is the unit the pipeline cuts at. ``describe_gpt`` and ``describe_transformer`` count a GPT's layers by
formula (embeddings, ``n_layer`` blocks, final norm + head); ``describe_module`` measures an arbitrary module:
its children (or the ``layers`` given) in the order they run, each with the tensor it received, FLOPs counted by
``tilestack.perf.profile.count_ops`` and bytes saved for backward by ``tilestack.parallel.memory``.

Only layers whose kind is ``"block"`` (a transformer block laid out as ``tilestack.parallel.model.Block``) can be
tensor-parallel; the planner keeps tp = 1 for a model with other layers unless they say how they shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

from tilestack.errors import TilestackError

FP32_BYTES = 4
INT64_BYTES = 8
INT64_MAX = 2**63 - 1          # the largest size torch (and every count below) can hold
MAX_LAYERS = 1 << 16           # describe_transformer builds one LayerDesc per layer
# Per transformer block (GPT-2 layout): q, k, v, o, fc, proj weights and biases, two LayerNorms (weight, bias)
BLOCK_TENSORS = 16
# Training FLOPs are forward + backward = 3 x forward (backward computes the input and the weight gradients)
TRAIN_FLOPS_PER_FORWARD = 3
# Megatron TP per block: forward all-reduces after o_proj and mlp.proj, backward their conjugates (Shoeybi 2019)
TP_ALLREDUCES_FWD = 2
TP_ALLREDUCES_BWD = 2


class PlanError(TilestackError, ValueError):
    """A planning question that cannot be answered as asked: names the argument, what was given and expected."""


def _int_in(value: Any, low: int, high: int) -> int | None:
    """``value`` as an int in [low, high], a NumPy int being one (np.int64(4) was refused as no int); None where it is
    no such int (a size past int64, 1 << 70, was counted as given)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high:
        return int(value)
    return None


def _positive_int(where: str, arg: str, value: Any, most: int) -> int:
    """``value`` as an int in [1, most] (n_layer=1 << 70 built one LayerDesc per layer until memory ran out)."""
    out = _int_in(value, 1, most)
    if out is None:
        limit = "" if most == INT64_MAX else f" up to {most}"
        raise PlanError(f"{where}: {arg}={value!r}; expected a positive int{limit}")
    return out


@dataclasses.dataclass(frozen=True)
class LayerDesc:
    """One layer, per sample (a sequence of ``seq`` tokens; a micro-batch of b samples costs b times this).

    params          parameter elements
    tensors         parameter tensors (the optimizer's per-tensor overhead)
    tp_params       of ``params``, those split over the tensor-parallel group (the rest are replicated)
    flops_fwd       forward FLOPs; backward is twice that
    matmul_flops    of ``flops_fwd``, those in matrix products (the rest: attention's scores and elementwise)
    act_bytes       bytes saved for backward, by recompute policy ("none", "selective", "full")
    act_tp_bytes    of act_bytes["none"] and ["selective"], the bytes that tensor parallelism divides by tp
                    without sequence parallelism (with it, all of them are divided)
    out_bytes       bytes of the layer's output (what a pipeline stage sends to the next)
    tp_comm_bytes   bytes all-reduced over the tp group per forward collective (each of TP_ALLREDUCES_FWD)
selective_flops forward FLOPs recomputed under selective recompute (attention scores, softmax, times V)
    frozen          of ``params``, those that do not require grad (no gradient, no optimizer state)
    buffer_bytes    bytes of the layer's buffers (BatchNorm's running statistics, a rotary table): every rank that
                    holds the layer keeps them whole
    param_bytes     bytes of ``params`` when they are not all of the model's dtype_bytes (a module with parameters of
                    several dtypes); 0: params x dtype_bytes
    act_fixed_bytes bytes saved for backward once per micro-batch, whatever its size (a weight derived from the
                    parameters in each forward: weight norm's, a cast copy; a position table broadcast over the
                    batch), beside ``act_bytes`` per sample (recompute policies "none" and "selective")
    frozen_bytes    of ``param_bytes``, those of the ``frozen`` parameters (a bf16 frozen base under f32 LoRA
                    adapters, an int64 table: gradients and AdamW's moments are of the trained ones' own dtype);
                    0: frozen x the layer's bytes per element
    frozen_tensors  of ``tensors``, those frozen (AdamW steps, and pays its per-tensor cost for, the others only)
    in_bytes        bytes of the per-sample tensors (batch first) a pipeline stage that begins with the layer
                    receives: the layer's own arguments (a decoder block's input and the encoder's output it
                    attends to) and those made before it that a later layer receives (a U-Net's skips, the other
                    tower's output, a model input a later layer reads); 0: the previous layer's ``out_bytes``
    shared          parameters the layer uses that an earlier layer counts (a head tied to the embedding, a block
                    called again): a pipeline stage that runs the layer without its owner holds them too
    shared_buffers  the same for buffers (one rotary or position table registered in every block; a block called
                    again): SharedParam's ``ordinal`` is then the buffer's place in the module's ``buffers()``
    kind            "embed", "block", "head" or "layer" (a measured module's child)
    """

    name: str
    params: int
    tensors: int
    flops_fwd: float
    act_bytes: dict[str, float]
    out_bytes: float
    kind: str = "layer"
    tp_params: int = 0
    matmul_flops: float = 0.0
    act_tp_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    tp_comm_bytes: float = 0.0
    selective_flops: float = 0.0
    buffer_bytes: float = 0.0
    frozen: int = 0
    param_bytes: float = 0.0
    shared: tuple[SharedParam, ...] = ()
    frozen_bytes: float = 0.0
    act_fixed_bytes: float = 0.0
    frozen_tensors: int = 0
    in_bytes: float = 0.0
    shared_buffers: tuple[SharedParam, ...] = ()

    @property
    def tp_able(self) -> bool:
        return self.kind in ("embed", "block", "head")


@dataclasses.dataclass(frozen=True)
class SharedParam:
    """A parameter tensor a layer uses but an earlier layer counts: ``ordinal``, its place in the module's
    ``parameters()`` (one tensor, however many layers use it); ``owner``, the index of the layer that counts it;
    its elements, bytes, and whether it is trained (requires grad)."""

    ordinal: int
    owner: int
    numel: int
    nbytes: int
    trained: bool


@dataclasses.dataclass(frozen=True)
class ModelDesc:
    """A model as the planner sees it: ``layers`` in order, ``seq`` tokens per sample, ``dtype_bytes`` per
    parameter and activation element, ``n_head`` / ``d`` / ``vocab`` where tensor parallelism must divide them,
    and ``config`` (ModelConfig keywords) when it is tilestack's parallel GPT, so that a plan can run."""

    name: str
    layers: tuple[LayerDesc, ...]
    seq: int
    dtype_bytes: int = FP32_BYTES
    n_head: int | None = None
    d: int | None = None
    vocab: int | None = None
    config: dict[str, Any] | None = None

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs of one sample (forward + backward), for MFU."""
        return TRAIN_FLOPS_PER_FORWARD * sum(layer.flops_fwd for layer in self.layers)

    @property
    def tp_able(self) -> bool:
        return all(layer.tp_able for layer in self.layers)

    def tp_divides(self, tp: int) -> bool:
        """Whether ``tp`` whole heads, columns and vocabulary rows go to each tensor-parallel rank."""
        if tp == 1:
            return True
        if not self.tp_able:
            return False
        dims = [v for v in (self.n_head, self.d, self.vocab) if v is not None]
        if self.config:
            dims.append(self.config.get("max_seq", 0) or tp)
        return all(v % tp == 0 for v in dims)


def _block(s: int, h: int, a: int, e: int, i: int, flash: bool = False) -> LayerDesc:
    """A GPT-2 block of width h, a heads, at s tokens, e bytes per element (Korthikanti et al. 2022, no dropout).

    Activations (tilestack.parallel.memory, per sample): s h (32 + 2 a s / h) e / 2 bytes; selective recompute
    drops the 2 a s^2 e / 2 scores; full keeps the block's input s h e. Of the 32 s h, the LayerNorm inputs and
    the residual-stream tensors (10 s h in the paper's 16-bit count) are not split by tensor parallelism without
    sequence parallelism; the rest (the projections' outputs, 24 s h, and the scores) are. ``flash``: a fused
    attention (SDPA's flash kernel, tilestack's) keeps no scores, only its f32 log-sum-exp per row and head."""
    from tilestack.parallel.memory import korthikanti_bytes
    params = 12 * h * h + 13 * h
    matmul = 24 * s * h * h                      # q, k, v, o (4 x 2 s h^2) and the MLP (2 x 8 s h^2)
    scores = 4 * s * s * h                       # q k^T and p v, the full (s, s) product (the model masks it)
    act = {p: korthikanti_bytes(s=s, b=1, h=h, a=a, policy=p, dropout=False, bytes_per_element=e)
           for p in ("none", "selective", "full")}
    if flash:
        act["none"] = act["selective"] + a * s * FP32_BYTES
    replicated = 10 * s * h * e / 2              # not split by tp without sp (Korthikanti et al., eq. 2)
    act_tp = {p: max(act[p] - replicated, 0.0) for p in ("none", "selective")}
    return LayerDesc(name=f"layers.{i}", params=params, tensors=BLOCK_TENSORS, flops_fwd=matmul + scores,
                     act_bytes=act, out_bytes=s * h * e, kind="block", tp_params=12 * h * h + 9 * h,
                     matmul_flops=matmul, act_tp_bytes=act_tp, tp_comm_bytes=s * h * e, selective_flops=scores)


def describe_transformer(*, n_layer: int, d: int, n_head: int, vocab: int, seq: int, dtype_bytes: int = FP32_BYTES,
                         max_seq: int | None = None, name: str | None = None,
                         config: dict[str, Any] | None = None, flash: bool = False) -> ModelDesc:
    """A GPT-2 shaped decoder (learned positions, pre-LN, MLP of 4d, untied head) counted by formula; ``flash``:
    its attention is fused (keeps no scores)."""
    n_layer, d, n_head, vocab, seq, dtype_bytes = (
        _positive_int("describe_transformer", arg, v, MAX_LAYERS if arg == "n_layer" else INT64_MAX)
        for arg, v in (("n_layer", n_layer), ("d", d), ("n_head", n_head), ("vocab", vocab), ("seq", seq),
                       ("dtype_bytes", dtype_bytes)))
    if d % n_head:
        raise PlanError(f"describe_transformer: d={d} is not divisible by n_head={n_head}; expected whole heads")
    if max_seq is not None:
        if _int_in(max_seq, seq, INT64_MAX) is None:
            raise PlanError(f"describe_transformer: max_seq={max_seq!r} with seq={seq}; expected an int >= seq (the "
                            "position table's rows)")
        max_seq = int(max_seq)   # (a NumPy int, as its seq)
    max_seq = max_seq or seq
    s, h, e = seq, d, dtype_bytes
    # embeddings: token + position lookups; backward keeps the int64 ids (and the position ids)
    embed = LayerDesc(name="embed", params=(vocab + max_seq) * h, tensors=2, flops_fwd=float(s * h),
                      act_bytes={p: 2.0 * s * INT64_BYTES for p in ("none", "selective", "full")},
                      out_bytes=s * h * e, kind="embed", tp_params=(vocab + max_seq) * h,
                      act_tp_bytes={"none": 0.0, "selective": 0.0}, tp_comm_bytes=s * h * e)
    # final LayerNorm (input, output, per-row mean and 1/std) and the head; cross-entropy keeps its f32
    # log-softmax (s, vocab). bf16 logits are not kept: their f32 cast saves nothing for its backward, so they
    # are freed once cast (the H200's peaks, session 11: counting them over-predicted every plan by one
    # (b, s, vocab) bf16 tensor, 0.70 GiB at b=8 x 1024 tokens of GPT-2's vocabulary)
    head_act = 2 * s * h * e + 2 * s * FP32_BYTES + s * vocab * FP32_BYTES
    head = LayerDesc(name="head", params=2 * h + vocab * h, tensors=3, flops_fwd=float(2 * s * h * vocab),
                     act_bytes={p: float(head_act) for p in ("none", "selective", "full")},
                     out_bytes=float(s * vocab * e), kind="head", tp_params=vocab * h, matmul_flops=2.0 * s * h * vocab,
                     act_tp_bytes={"none": 0.0, "selective": 0.0})
    blocks = tuple(_block(s, h, n_head, e, i, flash) for i in range(n_layer))
    return ModelDesc(name=name or f"gpt-L{n_layer}-d{d}", layers=(embed, *blocks, head), seq=seq, dtype_bytes=e,
                     n_head=n_head, d=d, vocab=vocab, config=config)


def describe_gpt(cfg: Any, seq: int, *, dtype_bytes: int = FP32_BYTES, name: str | None = None) -> ModelDesc:
    """tilestack.parallel's GPT of ``cfg`` (a ModelConfig) at ``seq`` tokens: runnable by ``tilestack train``."""
    from tilestack.parallel.model import ModelConfig
    if not isinstance(cfg, ModelConfig):
        raise PlanError(f"describe_gpt: cfg={type(cfg).__name__}; expected a tilestack.parallel.model.ModelConfig "
                        "(describe_transformer or describe_module for other models)")
    if _int_in(seq, 1, INT64_MAX) is None:
        raise PlanError(f"describe_gpt: seq={seq!r}; expected a positive int (tokens per sequence)")
    seq = int(seq)   # (a NumPy int, as describe_transformer takes it)
    if seq > cfg.max_seq:
        raise PlanError(f"describe_gpt: seq={seq} is longer than the model's max_seq={cfg.max_seq}")
    return describe_transformer(n_layer=cfg.n_layer, d=cfg.d, n_head=cfg.n_head, vocab=cfg.vocab, seq=seq,
                                dtype_bytes=dtype_bytes, max_seq=cfg.max_seq, config=dataclasses.asdict(cfg),
                                name=name or f"gpt-L{cfg.n_layer}-d{cfg.d}", flash=cfg.attention != "math")


def _is_container(module: Any) -> bool:
    from torch import nn
    return isinstance(module, nn.ModuleList | nn.Sequential | nn.ModuleDict)


def _children_in_order(module: Any) -> list[tuple[str, Any]]:
    """The candidate layers of a module, in registration order: its children, each container child (ModuleList,
    Sequential, ModuleDict) replaced by its elements, recursively. ``_trace`` puts them in call order."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, parent: Any) -> None:
        for n, m in parent.named_children():
            name = f"{prefix}{n}"
            if _is_container(m) and len(m):
                walk(f"{name}.", m)
            else:
                out.append((name, m))

    walk("", module)
    return out


@dataclasses.dataclass
class _Call:
    """One call of a layer during the example's forward: the arguments it received (cloned as they were then) and
    the bytes of what it returned."""

    name: str
    module: Any
    args: tuple
    kwargs: dict
    out_bytes: int
    in_bytes: int = 0                            # _received_bytes of the arguments
    received: dict = dataclasses.field(default_factory=dict)   # _received: (tensor key) -> (storage, bytes)
    made: set = dataclasses.field(default_factory=set)         # the storages of what it returned


def _received(a: Any, batch: int, held: set[int]) -> dict[tuple, tuple[int, int]]:
    """The per-sample tensors (first dim the batch) in a call's arguments ``a``, each once, by (address, bytes,
    dtype): their storage's address and their bytes. Parameters and buffers (storages in ``held``: a table handed
    to every block) are held by the stage, not received."""
    seen: dict[tuple, tuple[int, int]] = {}
    for t in _tensors_of(a):
        ptr = t.untyped_storage().data_ptr()
        if t.dim() >= 1 and t.shape[0] == batch and ptr not in held:
            # keyed by bytes, not shape: a view of the same elements (nn.Flatten's output, which the next layer
            # takes) is one tensor to send; keyed by shape, a stage beginning at the Flatten carried its input and
            # its output, twice the bytes
            seen[(t.data_ptr(), t.numel() * t.element_size(), t.dtype)] = (ptr, t.numel() * t.element_size())
    return seen


def _received_bytes(a: Any, batch: int, held: set[int]) -> int:
    """Bytes of the per-sample tensors in a call's arguments ``a`` (``_received``)."""
    return sum(n for _, n in _received(a, batch, held).values())


def _carried_bytes(calls: list[_Call], inputs: set[int]) -> list[int]:
    """Per call j, the bytes a pipeline stage that begins with it receives: its own per-sample arguments, and
    every per-sample tensor that existed before it (a model input, or what an earlier call received or returned)
    and that a later call receives. A U-Net's up block takes a down block's output as its skip, a fusion block
    the other tower's output, a decoder's embedding an input of the model: a cut between them must carry those
    tensors past the layers in between (the first stage still has the model's inputs: call 0 gets its own).
    ``inputs``: the storages of the model's own inputs. Tensors are told apart by their storage (``_trace`` keeps
    them alive, so no address is reused); those the module's own code makes between calls (a pooled or
    concatenated skip) count where they are received, not before."""
    before: set[int] = set(inputs)                 # storages that exist before call j
    out = []
    for j, call in enumerate(calls):
        carried = dict(call.received)
        for later in calls[j + 1:]:
            carried.update((k, v) for k, v in later.received.items() if v[0] in before)
        out.append(sum(n for _, n in carried.values()) if j else call.in_bytes)
        before |= {ptr for ptr, _ in call.received.values()} | call.made
    return out


def _tensors_of(obj: Any) -> list[Any]:
    """Every tensor inside ``obj`` (nested tuples, lists, dicts, dataclass-like outputs with ``values()``)."""
    import torch
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_of(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors_of(v)]
    return []


def _map_tensors(obj: Any, fn: Any) -> Any:
    import torch
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _example_args(example_input: Any, where: str) -> tuple:
    """The module's positional arguments: the example tensor, or a tuple of them, each with the batch first."""
    import torch
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    bad = [type(a).__name__ for a in args if not isinstance(a, torch.Tensor) or a.dim() < 1 or a.shape[0] < 1]
    if not args or bad:
        raise PlanError(f"{where}: example_input={type(example_input).__name__}"
                        f"{' of ' + ', '.join(bad) if isinstance(example_input, tuple) else ''}; expected a tensor "
                        "whose first dim is a batch of at least one sample (or a tuple of such tensors, the "
                        "module's positional arguments)")
    if len({a.shape[0] for a in args}) > 1:
        raise PlanError(f"{where}: example_input has batch sizes {[a.shape[0] for a in args]}; expected one batch "
                        "size (the first dim of every tensor)")
    if any(a.is_meta for a in args):
        raise PlanError(f"{where}: example_input is on the meta device; expected real values (on the CPU), whose "
                        "forward can be run and measured")
    for a in args:
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise PlanError(f"{where}: example_input holds NaN or inf; expected finite values")
    return tuple(_savable(a) for a in args)


def _savable(t: Any) -> Any:
    """An example tensor made under torch.inference_mode (data prepared without autograd) as a normal copy:
    autograd may not save an inference tensor, and measuring what a layer keeps for its backward failed inside
    torch ("Inference tensors cannot be saved for backward"). Other values as they are."""
    return _map_tensors(t, lambda x: x.clone() if x.is_inference() else x)


def _example_kwargs(example_kwargs: Any, batch: int, where: str) -> dict[str, Any]:
    """The module's keyword arguments (a mask, a flag): a dict by name; tensors whose first dim is the batch are
    per sample (repeated with it), others (a table, a scalar) are passed as they are."""
    import torch
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise PlanError(f"{where}: example_kwargs={type(example_kwargs).__name__}; expected a dict of the "
                        "forward's keyword arguments by name")
    for k, v in example_kwargs.items():
        for t in _tensors_of(v):
            if t.is_meta:
                raise PlanError(f"{where}: example_kwargs[{k!r}] is on the meta device; expected real values")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise PlanError(f"{where}: example_kwargs[{k!r}] holds NaN or inf; expected finite values")
    return {k: _savable(v) for k, v in example_kwargs.items()}


def _check_module(module: Any, layers: Any, where: str) -> list[tuple[str, Any]] | None:
    from torch import nn
    if not isinstance(module, nn.Module):
        raise PlanError(f"{where}: module={type(module).__name__}; expected a torch.nn.Module")
    # a module on the meta device has no storage: autograd's saved tensors could not be told apart (every
    # storage's address is 0) and the NaN check cannot read the input
    meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if meta:
        raise PlanError(f"{where}: module {type(module).__name__} has {len(meta)} tensors on the meta device "
                        f"({meta[0]!r}, ...); expected a module with its tensors materialized (on the CPU), or "
                        "describe_transformer for a model counted by formula")
    inference = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_inference()]
    if inference:      # autograd may not save them: measuring the backward's activations failed inside torch
        raise PlanError(f"{where}: module {type(module).__name__} has {len(inference)} inference tensors "
                        f"({inference[0]!r}, ...: made under torch.inference_mode); expected a module built outside "
                        "inference mode (torch.no_grad() makes tensors autograd can save)")
    # AdamW (the optimizer the planner counts and tilestack's Trainer steps) takes no sparse gradients
    sparse = [n for n, m in module.named_modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]
    if sparse:
        raise PlanError(f"{where}: module {type(module).__name__} has embeddings with sparse=True ({sparse}); "
                        "expected dense gradients (the planner counts AdamW's state and dense gradients; AdamW "
                        "takes no sparse gradients)")
    if layers is None:
        return None
    try:
        chain = [(n, m) for n, m in layers]
    except (TypeError, ValueError):
        raise PlanError(f"{where}: layers={type(layers).__name__}; expected a sequence of (name, module) pairs"
                        ) from None
    bad = [n for n, m in chain if not isinstance(n, str) or not isinstance(m, nn.Module)]
    names = [n for n, _ in chain]
    if not chain or bad or len(set(names)) != len(names):
        raise PlanError(f"{where}: layers={names}; expected a non-empty sequence of (name, module) pairs with "
                        "distinct string names")
    return chain


def _detached(t: Any) -> Any:
    return t.detach().clone()


@contextlib.contextmanager
def _restored(module: Any, handles: Sequence[Any] = ()) -> Iterator[None]:
    """Within the block, ``module`` may run (and move BatchNorm's running statistics): on leaving it, however it is
    left, the hooks ``handles`` are removed and the module's buffers hold again what they held on entering."""
    import torch
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _trace(module: Any, args: tuple, chain: list[tuple[str, Any]], kwargs: dict | None = None) -> list[_Call]:
    """Run ``module(*args, **kwargs)`` once (no grad; its buffers, e.g. BatchNorm's running statistics, and the random
    state restored after) and record the calls of the ``chain`` layers in the order they ran; a layer called
    from inside another recorded layer belongs to that one."""
    import torch
    calls: list[_Call] = []
    active: list[str] = []
    handles = []
    batch = args[0].shape[0]
    held = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    alive: list[Any] = []                        # what the calls received and returned: no address is reused
    for name, layer in chain:
        def pre(mod, a, kw, name=name):
            if not active:
                received = _received((a, kw), batch, held)
                alive.extend(_tensors_of((a, kw)))
                calls.append(_Call(name, mod, _map_tensors(a, _detached), _map_tensors(kw, _detached), 0,
                                   sum(n for _, n in received.values()), received))
            active.append(name)

        def post(mod, a, kw, out, name=name):
            active.pop()
            if not active and calls and calls[-1].name == name:
                calls[-1].out_bytes = sum(t.numel() * t.element_size() for t in _tensors_of(out))
                calls[-1].made = {t.untyped_storage().data_ptr() for t in _tensors_of(out)}
                alive.extend(_tensors_of(out))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with _restored(module, handles), torch.no_grad(), torch.random.fork_rng(devices=[]):
            module(*args, **(kwargs or {}))
    except PlanError:
        raise
    except Exception as e:
        raise PlanError(f"describe_module: {type(module).__name__}(example_input) failed ({type(e).__name__}: "
                        f"{e}); expected a module that runs on the example input (keyword arguments: "
                        "example_kwargs)") from e
    # what a stage beginning with each call receives: its arguments and what later calls take from before it
    inputs = {t.untyped_storage().data_ptr() for t in _tensors_of((args, kwargs))}
    for call, carried in zip(calls, _carried_bytes(calls, inputs), strict=True):
        call.in_bytes = carried
    return calls


def _saved_per_call(module: Any, args: tuple, chain: list[tuple[str, Any]], n_calls: int,
                    kwargs: dict | None = None) -> tuple[list[int], int]:
    """Bytes autograd saves for backward in a training forward of the whole module, by the recorded call that saved
    each storage first (what runs between calls, in the module's own forward, goes to the call before it, or the
    first). Counted over the whole model, a tensor one layer saves as its output and the next as its input (ReLU
    then Linear) is one storage, counted once; parameters and buffers are not activations. Also returns the number
    of calls the forward made."""
    import torch
    skip = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    owner: dict[int, tuple[int, int]] = {}
    state = {"call": 0, "depth": 0}

    def pack(t: Any) -> Any:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and ptr != 0:
            call, size = owner.get(ptr, (max(state["call"] - 1, 0), 0))
            owner[ptr] = (call, max(size, st.nbytes()))
        return t

    def pre(*_: Any) -> None:
        if state["depth"] == 0:
            state["call"] += 1
        state["depth"] += 1

    def post(*_: Any) -> None:
        state["depth"] -= 1

    handles = [h for _, layer in chain for h in (layer.register_forward_pre_hook(pre),
                                                 layer.register_forward_hook(post))]
    with _restored(module, handles), torch.random.fork_rng(devices=[]), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*args, **(kwargs or {}))
        del out
    per_call = [0] * n_calls
    for call, size in owner.values():
        per_call[min(call, n_calls - 1)] += size
    return per_call, state["call"]


def _saved_split(module: Any, args: tuple, chain: list[tuple[str, Any]], calls: list[_Call],
                 kwargs: dict | None = None) -> list[tuple[float, float]]:
    """Per recorded call: the bytes saved for backward per sample, and those saved once per forward whatever the
    batch (a weight derived from the parameters in each forward, weight norm's; a table broadcast over the batch).
    Measured at the example's batch B and again at the example twice over (2B samples, each routed as before):
    per sample (S(2B) - S(B)) / B, once 2 S(B) - S(2B). A batch-independent tensor is made of the parameters and
    buffers the layer holds: a "once" part larger than twice their bytes is no such tensor but a workspace rounded
    up in steps (LSTM's on a CPU), which two batches cannot fit; then, as when the doubled forward made other calls
    or failed, all of S(B) is per sample. What the example's batch saved is kept exactly either way."""
    import torch
    batch, n_calls = args[0].shape[0], len(calls)
    saved, _ = _saved_per_call(module, args, chain, n_calls, kwargs)

    def twice(t: Any) -> Any:                    # a per-sample tensor (batch first) twice over; others as they are
        return torch.cat([t, t]) if t.dim() >= 1 and t.shape[0] == batch else t

    try:
        doubled, made = _saved_per_call(module, tuple(torch.cat([a, a]) for a in args), chain, n_calls,
                                        _map_tensors(kwargs or {}, twice))
    except Exception:
        doubled, made = saved, -1
    out = []
    for call, s, s2 in zip(calls, saved, doubled, strict=True):
        held = sum(t.numel() * t.element_size() for t in (*call.module.parameters(), *call.module.buffers()))
        once = 2 * s - s2
        if made != n_calls or once <= 0 or s2 < s or once > 2 * held:
            out.append((s / batch, 0.0))
        else:
            out.append(((s2 - s) / batch, float(once)))
    return out


def _loss_of(out: Any) -> Any:
    """A scalar whose backward reaches every floating output: their sum."""
    import torch
    floats = [t for t in _tensors_of(out) if t.is_floating_point() or t.is_complex()]
    grads = [t.float().sum() for t in floats if t.requires_grad]
    if not grads:
        return torch.zeros((), requires_grad=True)           # nothing to differentiate: a backward that does nothing
    return torch.stack(grads).sum()


def _leaves(obj: Any) -> Any:
    """The call's tensors as fresh leaves (floating ones requiring grad, as activations do in training)."""
    return _map_tensors(obj, lambda t: t.detach().clone().requires_grad_(t.is_floating_point()))


def _fresh(obj: Any) -> Any:
    """Non-leaf copies of the leaves (a layer may work in place on its input, as ReLU(inplace=True) does)."""
    return _map_tensors(obj, lambda t: t.clone() if t.requires_grad else t)


def describe_module(module: Any, example_input: Any, *, layers: Sequence[tuple[str, Any]] | None = None,
                    name: str | None = None, example_kwargs: dict[str, Any] | None = None) -> ModelDesc:
    """Measure a torch module as a sequence of layers. ``example_input``: a tensor whose first dim is the batch
    (token ids are fine), or a tuple of them (the module's positional arguments); ``example_kwargs``: its keyword
    arguments by name (an attention mask; a tensor whose first dim is the batch is per sample). ``layers``
    (default: the module's children, container children by their elements) are put in the order they run on the example,
    however they were registered; each is measured on the arguments it really received: parameters, forward FLOPs
    (tilestack.perf.profile.count_ops), bytes saved for backward with and without recompute
    (tilestack.parallel.memory.saved_activation_bytes; "full" keeps the layer's inputs), the output bytes, all
    divided by the example's batch. A layer called twice is two layers, its parameters counted once; parameters
    shared by several layers (tied weights) count once, at their first use; parameters and buffers of no layer
    (the root's own, unused children's) go to the first layer, so that the description's parameters are
    ``sum(p.numel() for p in module.parameters())``. A module with no child layers is one layer."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        # a description is of training (what the backward keeps): under no_grad or inference_mode nothing was
        # saved, and every layer was described as keeping no activations, without a word
        with torch.inference_mode(False), torch.enable_grad():
            return describe_module(module, example_input, layers=layers, name=name, example_kwargs=example_kwargs)
    from tilestack.parallel.memory import saved_activation_bytes
    from tilestack.perf.profile import count_ops
    chain = _check_module(module, layers, "describe_module")
    args = _example_args(example_input, "describe_module")
    kwargs = _example_kwargs(example_kwargs, args[0].shape[0], "describe_module")
    if chain is None:
        chain = _children_in_order(module) or [(type(module).__name__, module)]
    calls = _trace(module, args, chain, kwargs)
    if not calls:
        raise PlanError(f"describe_module: none of the layers {[n for n, _ in chain]} ran on the example input; "
                        "expected layers of the module (pass layers=[(name, submodule), ...])")
    batch = args[0].shape[0]
    seq = args[0].shape[1] if args[0].dim() > 1 else 1
    floats = [p for p in module.parameters() if p.is_floating_point()]
    dtype_bytes = floats[0].element_size() if floats else \
        args[0].element_size() if args[0].is_floating_point() else FP32_BYTES
    counted: set[int] = set()
    ordinal = {id(p): n for n, p in enumerate(module.parameters())}
    owner: dict[int, int] = {}                   # a parameter's id: the index of the layer that counts it
    buffer_ordinal = {id(t): n for n, t in enumerate(module.buffers())}
    buffer_owner: dict[int, int] = {}            # a buffer's id: the index of the layer that counts it
    out: list[LayerDesc] = []
    seen_names: dict[str, int] = {}
    per = 1.0 / batch
    saved_in_model = _saved_split(module, args, chain, calls, kwargs)
    for index, call in enumerate(calls):
        layer = call.module
        params = [p for p in layer.parameters() if id(p) not in counted]
        shared = tuple(SharedParam(ordinal[id(p)], owner[id(p)], p.numel(), p.numel() * p.element_size(),
                                   p.requires_grad) for p in layer.parameters() if id(p) in owner)
        counted.update(id(p) for p in params)
        owner.update((id(p), index) for p in params)
        bufs = [b for b in layer.buffers() if id(b) not in counted]
        # a buffer an earlier layer counts (one table registered in every block): a stage without that layer
        # holds it too, as the stage's modules register it
        shared_buffers = tuple(SharedParam(buffer_ordinal[id(t)], buffer_owner[id(t)], t.numel(),
                                           t.numel() * t.element_size(), False)
                               for t in layer.buffers() if id(t) in buffer_owner)
        counted.update(id(b) for b in bufs)
        buffer_owner.update((id(b), index) for b in bufs)
        leaf_args, leaf_kwargs = _leaves(call.args), _leaves(call.kwargs)

        def run(layer=layer, a=leaf_args, kw=leaf_kwargs):
            return layer(*_fresh(a), **_fresh(kw))

        def step(run=run) -> None:
            run()

        def run_full(layer=layer, a=leaf_args, kw=leaf_kwargs):
            fa, fkw = _fresh(a), _fresh(kw)
            keys = list(fkw)
            return checkpoint(lambda *xs: layer(*xs[:len(fa)], **dict(zip(keys, xs[len(fa):], strict=True))),
                              *fa, *fkw.values(), use_reentrant=False)

        try:
            with _restored(layer), torch.random.fork_rng(devices=[]):
                with torch.no_grad():
                    counts = count_ops(step)
                flops = sum(c.flops for c in counts.values())
                matmul = sum(c.flops for (op, _), c in counts.items()
                             if "mm" in op or "linear" in op or "conv" in op)
                grads = any(p.requires_grad for p in layer.parameters()) or any(
                    t.requires_grad for t in _tensors_of((leaf_args, leaf_kwargs)))
                own = list(layer.parameters())
                saved, saved_once = saved_in_model[index]
                alone = saved_activation_bytes(lambda run=run: _loss_of(run()), own) if grads else 0
                saved_full = saved_activation_bytes(lambda f=run_full: _loss_of(f()), own) if alone else 0
        except Exception as e:
            raise PlanError(f"describe_module: layer {call.name!r} ({type(layer).__name__}) failed when measured "
                            f"on the arguments it received ({type(e).__name__}: {e})") from e
        finally:
            layer.zero_grad(set_to_none=True)
        k = seen_names.get(call.name, 0)
        seen_names[call.name] = k + 1
        out.append(LayerDesc(name=call.name if k == 0 else f"{call.name}#{k + 1}",
                             params=sum(p.numel() for p in params), tensors=len(params),
                             frozen_tensors=sum(1 for p in params if not p.requires_grad),
                             in_bytes=call.in_bytes * per,
                             frozen=sum(p.numel() for p in params if not p.requires_grad),
                             flops_fwd=flops * per, matmul_flops=matmul * per,
                             act_bytes={"none": saved, "selective": saved, "full": saved_full * per},
                             act_fixed_bytes=saved_once,
                             out_bytes=call.out_bytes * per,
                             buffer_bytes=float(sum(b.numel() * b.element_size() for b in bufs)),
                             param_bytes=float(sum(p.numel() * p.element_size() for p in params)), shared=shared,
                             shared_buffers=shared_buffers,
                             frozen_bytes=float(sum(p.numel() * p.element_size() for p in params
                                                    if not p.requires_grad))))
    # what no recorded layer holds (the root's own parameters, children that did not run, buffers outside the
    # layers) is kept by the first stage
    rest = [p for p in module.parameters() if id(p) not in counted]
    rest_buffers = sum(b.numel() * b.element_size() for b in module.buffers() if id(b) not in counted)
    if rest or rest_buffers:
        first = out[0]
        out[0] = dataclasses.replace(first, params=first.params + sum(p.numel() for p in rest),
                                     frozen=first.frozen + sum(p.numel() for p in rest if not p.requires_grad),
                                     tensors=first.tensors + len(rest),
                                     frozen_tensors=first.frozen_tensors + sum(1 for p in rest if not p.requires_grad),
                                     param_bytes=first.param_bytes + sum(p.numel() * p.element_size() for p in rest),
                                     frozen_bytes=first.frozen_bytes + sum(p.numel() * p.element_size() for p in rest
                                                                           if not p.requires_grad),
                                     buffer_bytes=first.buffer_bytes + rest_buffers)
    return ModelDesc(name=name or type(module).__name__, layers=tuple(out), seq=seq, dtype_bytes=dtype_bytes)
