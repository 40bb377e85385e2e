"""The models of the planner's unseen-models round 7 (tests/parallel/test_plan_unseen_round7*.py).

A weight tied across two layers with a parameter-free layer between them, an MLP with BatchNorm's running
statistics, a bf16 model whose first layer is frozen, and one whose layers sit in a ModuleDict of nested
Sequentials (registered out of call order, one weight shared across its entries, a frozen BatchNorm).
"""

import torch
from torch import nn


class TiedAcross(nn.Module):
    """Linear(6, 6), ReLU, Linear(6, 6) whose weight is the first one's: 36 + 6 + 6 = 48 parameters, 3 tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def batchnorm_mlp():
    """Linear(5, 4), BatchNorm1d(4), ReLU, Linear(4, 3): 24 + 8 + 15 = 47 parameters; the BatchNorm's buffers are
    running_mean and running_var (4 f32 each) and num_batches_tracked (one int64): 40 bytes."""
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def frozen_bf16():
    """bf16 Linear(5, 4) frozen (24 elements, 48 bytes), ReLU, Linear(4, 3) trained (15 elements, 30 bytes)."""
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(torch.bfloat16)
    m[0].requires_grad_(False)
    return m


class Nested(nn.Module):
    """Token ids -> Embedding(11, 8) -> a ModuleDict registered {"late", "early"} but called early then late, each
    a Sequential of Linear(8, 8) and a nested Sequential (BatchNorm1d(5), frozen in "early"; ReLU), -> a head tied
    to the embedding. "late"'s Linear shares "early"'s weight (its own bias only)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.ModuleDict({
            "late": nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.BatchNorm1d(5), nn.ReLU())),
            "early": nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.BatchNorm1d(5), nn.ReLU())),
        })
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        self.body["late"][0].weight = self.body["early"][0].weight
        self.body["early"][1][0].requires_grad_(False)

    def forward(self, x):
        h = self.emb(x)
        for k in ("early", "late"):
            h = self.body[k](h)
        return self.head(h)
