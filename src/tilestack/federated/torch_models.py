"""PyTorch models for federated clients: a small CNN and a small transformer, behind the numpy models' interface.

    from tilestack.federated.torch_models import TorchModel
    model = TorchModel("cnn", num_features=64, num_classes=10)           # 8x8 images, as in sklearn's digits
    params = model.init(np.random.default_rng(0))                        # {"conv1.weight": (16, 1, 3, 3), ...}
    params, steps, loss = model.local_sgd(params, x, y, steps=20, batch_size=32, lr=0.05, rng=rng)
    logits = model.logits(params, x_test)                                 # (N, C) numpy

Parameters cross the wire as the numpy ``dict[str, np.ndarray]`` (float32) every strategy already handles,
named as the module's ``state_dict``; the client loads them into a cached ``torch.nn.Module``, trains with
plain SGD (FedProx's proximal term and SCAFFOLD's correction added to every gradient, as the numpy
``local_sgd`` does) on the GPU when there is one, and hands numpy back. So the same strategies, engines and
deployments run torch clients unchanged. Tasks pick them with ``Task(model="cnn" | "transformer")``.

- ``cnn``: the features are a square image (64 -> 8x8): conv3x3(16) relu, conv3x3(32) relu, maxpool 2,
  linear(64) relu, linear(C).
- ``transformer``: the features are ``tokens`` tokens (an 8x8 image: its 8 rows); each is embedded to
  ``d_model``, a learned position added, ``layers`` pre-norm encoder layers, mean pooling, linear(C).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from tilestack.federated.models import train_dtype

ARCHS = ("cnn", "transformer")
CNN_CHANNELS = (16, 32)
CNN_HIDDEN = 64
EVAL_BATCH = 4096  # rows per forward pass when scoring


class _CNN(nn.Module):
    def __init__(self, side: int, num_classes: int):
        super().__init__()
        c1, c2 = CNN_CHANNELS
        self.side = side
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * (side // 2) ** 2, CNN_HIDDEN)
        self.fc2 = nn.Linear(CNN_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, side * side)
        h = x.view(-1, 1, self.side, self.side)  # (B, 1, S, S)
        h = torch.relu(self.conv1(h))  # (B, c1, S, S)
        h = torch.max_pool2d(torch.relu(self.conv2(h)), 2)  # (B, c2, S/2, S/2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))  # (B, C)


class _Transformer(nn.Module):
    def __init__(self, num_features: int, num_classes: int, tokens: int, d_model: int, heads: int, layers: int):
        super().__init__()
        self.tokens, self.width = tokens, num_features // tokens
        self.embed = nn.Linear(self.width, d_model)
        self.pos = nn.Parameter(torch.zeros(tokens, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T * W)
        h = self.embed(x.view(-1, self.tokens, self.width)) + self.pos  # (B, T, D)
        h = self.norm(self.encoder(h)).mean(dim=1)  # (B, D)
        return self.head(h)  # (B, C)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchModel:
    """A torch architecture by name, with the numpy-parameter interface of ``models.MLP`` (see module doc)."""

    def __init__(self, arch: str, num_features: int, num_classes: int, *, tokens: int = 8, d_model: int = 32,
                 heads: int = 4, layers: int = 2):  # fmt: skip
        if arch not in ARCHS:
            raise ValueError(f"TorchModel: arch={arch!r}; expected one of {ARCHS}")
        if arch == "cnn":
            side = math.isqrt(num_features)
            if side * side != num_features or side % 2:
                raise ValueError(f"TorchModel: num_features={num_features} for cnn; expected an even square side**2")
        if arch == "transformer" and (tokens < 1 or num_features % tokens or d_model % heads):
            raise ValueError(
                f"TorchModel: tokens={tokens}, d_model={d_model}, heads={heads} for num_features={num_features}; "
                "expected tokens dividing num_features and heads dividing d_model"
            )
        self.arch, self.num_features, self.num_classes = arch, num_features, num_classes
        self.spec = (arch, num_features, num_classes, tokens, d_model, heads, layers)

    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """PyTorch's default initialisation, seeded from ``rng``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            module = _build(self.spec)
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}

    def _module(self, params: Mapping[str, np.ndarray]) -> nn.Module:
        """The cached module holding ``params``, in float64 where they are (``models.train_dtype``), else float32: a
        float64 model loaded into the float32 module trained in float32 and came back float64 with float32's values
        (the numpy models train a float64 model in float64)."""
        wide = any(train_dtype(v) == np.float64 for v in params.values())
        module = _cached_module(self.spec, torch.float64 if wide else torch.float32)
        dev = next(module.parameters()).device
        module.load_state_dict({k: torch.as_tensor(np.asarray(v), device=dev) for k, v in params.items()})
        return module

    def logits(self, params: Mapping[str, np.ndarray], x: np.ndarray, train: bool = False) -> np.ndarray:
        module = self._module(params)
        dev, dtype = next(module.parameters()).device, next(module.parameters()).dtype
        with torch.no_grad():
            out = [module(torch.as_tensor(x[i : i + EVAL_BATCH], device=dev, dtype=dtype)).float().cpu().numpy()
                   for i in range(0, len(x), EVAL_BATCH)]  # fmt: skip
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def local_sgd(
        self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int,
        lr: float, rng: np.random.Generator, prox_mu: float = 0.0, correction: Mapping[str, np.ndarray] | None = None,
        anchor: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], int, float]:  # fmt: skip
        """``steps`` minibatch SGD steps, batches walking fresh permutations as ``models.local_sgd`` does (the
        proximal term pulls towards ``anchor`` where given, else towards ``params``)."""
        module = self._module(params)
        dev = next(module.parameters()).device
        named = dict(module.named_parameters())
        start = {k: p.detach().clone() for k, p in named.items()} if prox_mu else {}
        if prox_mu and anchor is not None:
            start = {k: torch.as_tensor(np.asarray(anchor[k]), device=dev, dtype=p.dtype) for k, p in named.items()}
        corr = {k: torch.as_tensor(np.asarray(correction[k]), device=dev) for k in named} if correction else {}
        xt = torch.as_tensor(x, device=dev, dtype=next(module.parameters()).dtype)  # (N, D), as the module trains
        yt = torch.as_tensor(y, device=dev, dtype=torch.long)  # (N,)
        n = len(y)
        order, pos, total = rng.permutation(n), 0, 0.0
        module.train()
        for _ in range(steps):
            if pos >= n:
                order, pos = rng.permutation(n), 0
            idx = torch.as_tensor(order[pos : pos + batch_size], device=dev)
            pos += batch_size
            module.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                for k, p in named.items():
                    g = p.grad
                    if prox_mu:
                        g = g + prox_mu * (p - start[k])
                    if k in corr:
                        g = g + corr[k]
                    p -= lr * g
        module.eval()
        # copies (on the CPU .numpy() shares the cached module's memory, which the next client overwrites), in the
        # dtype the module trained in: float32, or float64 for a float64 model
        out = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
        return out, steps, total / steps if steps else float("nan")


def _build(spec: tuple) -> nn.Module:
    arch, d, c, tokens, d_model, heads, layers = spec
    if arch == "cnn":
        return _CNN(math.isqrt(d), c)
    return _Transformer(d, c, tokens, d_model, heads, layers)


@functools.lru_cache(maxsize=8)
def _cached_module(spec: tuple, dtype: torch.dtype = torch.float32) -> nn.Module:
    """One module per architecture, dtype and process, its weights replaced by each client's (building costs more)."""
    return _build(spec).to(device=_device(), dtype=dtype).eval()
