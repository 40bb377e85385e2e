"""Twenty-third held-out round for the model profiler: six models written for this round (their builders below),
profiled forward and trained, every row checked, and each model's FLOPs and the bytes of its telling rows written
out by hand from the layer shapes.

The models: capsule routing (an einsum into prediction vectors, three routing iterations of softmax, an einsum-sum,
the squash non-linearity and the agreement einsum); causal linear attention (an ELU+1 feature map, the running sum of
k v^T outer products by cumsum, einsums against it, the running normaliser); a Glow flow step (ActNorm, an invertible
1x1 convolution whose log-determinant is slogdet of its weight, an affine coupling by a 3x3 convolution, sigmoid
scales, the negative log-likelihood); a Gaussian-process marginal likelihood over learned features (cdist, an RBF
kernel, Cholesky, cholesky_solve, the log-determinant from the factor's diagonal); a DGCNN edge convolution (cdist,
the k nearest by topk, neighbours by torch.gather from an expanded view, edge features by cat, a shared linear, a max
over neighbours); an ESPCN super-resolution net (two convolutions, pixel_shuffle, a bicubic skip, a clamp). Op-level
checks of this round's fixes (complex factorisations, the Householder formulas' bounds, empty kernel names) and the
public API's refusals of bad arguments are in test_profile_unseen_round23_more.py.

What this round found (pinned in test_profile_unseen_round23_more.py): complex factorisations and solves (Cholesky,
LU, solve, inverse, QR, eigh, SVD, lstsq, the Householder products) were counted as real ones of their size, a
quarter of their work; ``formulas.householder_apply_flops`` and ``factorization_flops("householder_product")`` gave
negative FLOPs for more reflectors than the matrix has rows or columns; ``compute_metrics`` stored an empty name.

Every count is written from the shapes: a multiply-add is 2 FLOPs (torch's addmm counts the product alone, its bias
add not); a convolution by ``profile_support.conv``; element-wise ops one per output element; a reduction one per
element folded in; softmax by its ``formulas`` constant; a sort-free selection (topk) a compare per element; cdist 3
per feature of a pair; Cholesky n^3/3, a factored solve 2 n^2 k, a triangular solve n^2 k, LU 2 n^3/3; bicubic
interpolation a multiply-add per tap, 16 taps. Bytes are the distinct tensors an op reads and writes (fp32: 4 bytes,
int64: 8); an expanded tensor holds the elements of what it expands.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilestack.perf import formulas

sys.path.insert(0, str(Path(__file__).parent))
from _profile_helpers import FILTERS, check_every_row, one_row, setup_round  # noqa: E402
from profile_support import by_op, conv, flops_of, rows_of, seeded  # noqa: E402

pytestmark = FILTERS
F32, I64 = 4, 8
SOFTMAX = formulas.SOFTMAX_FLOPS_PER_ELEMENT
CDIST = formulas.CDIST_FLOPS_PER_TERM  # subtract, square, accumulate per feature of a pair
BICUBIC_TAPS = 16


# --- the models ----------------------------------------------------------------------------------------------------
# capsule routing: batch, input capsules, input width, output capsules, output width, routing iterations
CP_B, CP_I, CP_D, CP_O, CP_K, CP_ITERS = 2, 6, 4, 3, 5, 3
SQUASH_EPS = 1e-8


class CapsuleRouting(nn.Module):
    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(CP_I, CP_O, CP_K, CP_D) * 0.1)

    @staticmethod
    def squash(s):  # (B, O, K)
        sq = (s * s).sum(-1, keepdim=True)  # (B, O, 1)
        return sq / (1 + sq) * s / torch.sqrt(sq + SQUASH_EPS)

    def forward(self, u):  # (B, I, D)
        u_hat = torch.einsum("bid,iokd->biok", u, self.W)  # (B, I, O, K) prediction vectors
        logits = torch.zeros(CP_B, CP_I, CP_O)
        for it in range(CP_ITERS):
            c = logits.softmax(dim=2)  # (B, I, O) coupling coefficients
            v = self.squash(torch.einsum("bio,biok->bok", c, u_hat))  # (B, O, K)
            if it < CP_ITERS - 1:
                logits = logits + torch.einsum("biok,bok->bio", u_hat, v)  # agreement
        return v.norm(dim=-1)  # (B, O) class lengths


@seeded
def capsule():
    return CapsuleRouting(), (torch.randn(CP_B, CP_I, CP_D),)


# causal linear attention: batch, heads, length, head width
LA_B, LA_H, LA_L, LA_D = 2, 2, 5, 3
LA_W = LA_H * LA_D


class CausalLinearAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(LA_W, 3 * LA_W, bias=False)
        self.out = nn.Linear(LA_W, LA_W)

    def forward(self, x):  # (B, L, W)
        q, k, v = self.qkv(x).view(LA_B, LA_L, 3, LA_H, LA_D).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
        q, k = F.elu(q) + 1, F.elu(k) + 1  # a positive feature map
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (B, H, L, D, D) running sums of k v^T
        num = torch.einsum("bhld,bhlde->bhle", q, kv)  # (B, H, L, D)
        den = (q * k.cumsum(2)).sum(-1, keepdim=True)  # (B, H, L, 1)
        return self.out((num / den).transpose(1, 2).reshape(LA_B, LA_L, LA_W))


@seeded
def linear_attention():
    return CausalLinearAttention(), (torch.randn(LA_B, LA_L, LA_W),)


# Glow flow step: batch, channels, side
GL_B, GL_C, GL_S = 2, 4, 3
GL_HALF, GL_PIX = GL_C // 2, GL_S * GL_S
GL_SCALE_BIAS = 2.0  # the coupling's scales start near sigmoid(2)


class GlowStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, GL_C, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, GL_C, 1, 1))
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(GL_C, GL_C))[0])  # invertible 1x1 convolution
        self.coupling = nn.Conv2d(GL_HALF, GL_C, 3, padding=1)

    def forward(self, x):  # (B, C, S, S) -> the batch's mean negative log-likelihood
        x = (x + self.loc) * torch.exp(self.log_scale)  # ActNorm
        logdet = GL_PIX * self.log_scale.sum()
        x = F.conv2d(x, self.weight.view(GL_C, GL_C, 1, 1))
        logdet = logdet + GL_PIX * torch.linalg.slogdet(self.weight)[1]
        xa, xb = x.chunk(2, dim=1)  # (B, C/2, S, S) each
        shift, raw = self.coupling(xa).chunk(2, dim=1)
        scale = torch.sigmoid(raw + GL_SCALE_BIAS)
        yb = (xb + shift) * scale
        logdet = logdet + torch.log(scale).flatten(1).sum(1)  # (B,)
        y = torch.cat([xa, yb], dim=1)
        return (0.5 * (y * y).flatten(1).sum(1) - logdet).mean()


@seeded
def glow():
    return GlowStep(), (torch.randn(GL_B, GL_C, GL_S, GL_S),)


# Gaussian-process marginal likelihood: points, input width, feature width
GP_N, GP_IN, GP_F = 6, 3, 4


class GPMarginal(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(GP_IN, GP_F)
        self.log_length = nn.Parameter(torch.zeros(()))
        self.log_noise = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x, y):  # (N, IN), (N, 1)
        z = self.features(x) / torch.exp(self.log_length)  # (N, F)
        k = torch.exp(-0.5 * torch.cdist(z, z).pow(2)) + torch.exp(self.log_noise) * torch.eye(GP_N)  # (N, N)
        chol = torch.linalg.cholesky(k)
        alpha = torch.cholesky_solve(y, chol)  # (N, 1)
        return 0.5 * (y * alpha).sum() + torch.log(torch.diagonal(chol)).sum()


@seeded
def gp():
    return GPMarginal(), (torch.randn(GP_N, GP_IN), torch.randn(GP_N, 1))


# DGCNN edge convolution: batch, points, coordinates, neighbours, width
EC_B, EC_N, EC_C, EC_K, EC_F = 2, 6, 3, 3, 8


class EdgeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(2 * EC_C, EC_F)

    def forward(self, pts):  # (B, N, C)
        dist = torch.cdist(pts, pts)  # (B, N, N)
        idx = dist.topk(EC_K, dim=-1, largest=False).indices  # (B, N, K): each point is among its own neighbours
        nbrs = torch.gather(pts.unsqueeze(1).expand(EC_B, EC_N, EC_N, EC_C), 2,
                            idx.unsqueeze(-1).expand(EC_B, EC_N, EC_K, EC_C))  # (B, N, K, C)
        centre = pts.unsqueeze(2).expand_as(nbrs)
        edges = torch.cat([centre, nbrs - centre], dim=-1)  # (B, N, K, 2C)
        return F.relu(self.mlp(edges)).amax(dim=2)  # (B, N, F)


@seeded
def edgeconv():
    return EdgeConv(), (torch.randn(EC_B, EC_N, EC_C),)


# ESPCN super-resolution with a bicubic skip: batch, channels, side, upscale, width
SR_B, SR_C, SR_S, SR_R, SR_W = 1, 1, 4, 2, 4


class Espcn(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(SR_C, SR_W, 3, padding=1)
        self.tail = nn.Conv2d(SR_W, SR_C * SR_R * SR_R, 3, padding=1)

    def forward(self, img):  # (B, C, S, S)
        h = self.tail(torch.tanh(self.body(img)))  # (B, C r^2, S, S)
        up = F.interpolate(img, scale_factor=SR_R, mode="bicubic", align_corners=False)  # (B, C, rS, rS)
        return (F.pixel_shuffle(h, SR_R) + up).clamp(0, 1)


@seeded
def espcn():
    return Espcn(), (torch.rand(SR_B, SR_C, SR_S, SR_S),)


MODELS = {"capsule": (capsule, True), "linear_attention": (linear_attention, True), "glow": (glow, True),
          "gp": (gp, True), "edgeconv": (edgeconv, True), "espcn": (espcn, True)}
CASES, IDS, profiled = setup_round(MODELS)
DATA_MOVEMENT = {
    "aten::clone", "aten::copy_", "aten::cat", "aten::stack", "aten::gather", "aten::scatter", "aten::new_zeros",
    "aten::zeros", "aten::eye", "aten::flip", "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::tril",
    "aten::diag_embed", "aten::diagonal_backward", "aten::masked_fill_", "aten::scalar_tensor", "aten::fill_",
    "aten::_linalg_check_errors", "aten::zero_", "aten::slice_backward", "aten::select_backward",
}


@pytest.mark.parametrize("name,train", CASES, ids=IDS)
def test_every_row_is_finite_counted_placed_and_adds_up(name, train):
    """Rows add up to the counted step; nothing that computes is uncounted or counted free; torch's formulas agreed
    with (but its convolutions'); each counted row placed by its intensity; the table renders."""
    p, counts, theirs = profiled(name, train)
    text = check_every_row(p, counts, theirs, data_movement=DATA_MOVEMENT)
    assert "no FLOP formula" not in text
    assert {o.m.config["step"] for o in p.ops} == {"forward+backward" if train else "forward"}


# --- capsule routing -----------------------------------------------------------------------------------------------
CP_PRED = CP_B * CP_I * CP_O * CP_K  # elements of the prediction vectors
CP_U_HAT = 2 * CP_PRED * CP_D  # the einsum into them
CP_SUM = 2 * CP_PRED  # the coupling-weighted sum over inputs, and the agreement: one multiply-add per prediction
CP_V = CP_B * CP_O * CP_K  # elements of the output capsules
CP_SQUASH = 4 * CP_V + 4 * CP_B * CP_O  # s*s, its sum, the two multiplies by s and 1/|s|; 1+, /, +eps, sqrt


def test_capsule_routing_by_hand():
    """The prediction einsum 2*B*I*O*K*D; per routing iteration the softmax over outputs 5 an element, the weighted
    sum over inputs and the squash; the agreement einsum and the logits update in all but the last iteration; the
    lengths (a vector norm 2 an element): 4344. The einsums run as bmm; the weighted sum reads the coupling
    coefficients and the prediction vectors once each."""
    p, counts, _ = profiled("capsule", False)
    per_iteration = SOFTMAX * CP_B * CP_I * CP_O + CP_SUM + CP_SQUASH
    agreement = CP_SUM + CP_B * CP_I * CP_O
    assert by_op(counts)["aten::bmm"] == CP_U_HAT + CP_ITERS * CP_SUM + (CP_ITERS - 1) * CP_SUM == 3240
    assert by_op(counts)["aten::_softmax"] == CP_ITERS * SOFTMAX * CP_B * CP_I * CP_O
    assert p.flops == CP_U_HAT + CP_ITERS * per_iteration + (CP_ITERS - 1) * agreement + 2 * CP_V == 4344
    weighted = one_row(counts, "aten::bmm", ((CP_B * CP_O, 1, CP_I), (CP_B * CP_O, CP_I, CP_K)))
    assert weighted.calls == CP_ITERS
    assert weighted.bytes_read == CP_ITERS * (CP_B * CP_I * CP_O + CP_PRED) * F32
    assert weighted.bytes_written == CP_ITERS * CP_V * F32


def test_capsule_routing_trained_skips_the_first_couplings_gradient():
    """Trained: the prediction einsum's weight gradient only (the input capsules need none); the first iteration's
    couplings are the softmax of zeros, so its weighted sum forms the predictions' gradient alone, the later two
    both operands'; the agreement einsums both: 7920 of bmm; softmax backward for the two iterations whose logits
    need a gradient."""
    _, counts, _ = profiled("capsule", True)
    backward = CP_U_HAT + CP_SUM + 2 * (CP_ITERS - 1) * CP_SUM + 2 * (CP_ITERS - 1) * CP_SUM
    forward = CP_U_HAT + (2 * CP_ITERS - 1) * CP_SUM
    assert by_op(counts)["aten::bmm"] == forward + backward == 7920
    back = one_row(counts, "aten::_softmax_backward_data")
    assert back.calls == CP_ITERS - 1


# --- causal linear attention ---------------------------------------------------------------------------------------
LA_ROWS = LA_B * LA_L
LA_E = LA_B * LA_H * LA_L * LA_D  # elements of q (k, v)
LA_OUTER = LA_E * LA_D  # elements of the running k v^T sums


def test_linear_attention_by_hand():
    """qkv 2*R*W*3W; ELU and +1 on q and k; the outer products and their cumsum one per element each; the einsum
    against them 2*B*H*L*D*D; k's cumsum, q*k, its sum and the divide one per element; the output projection and its
    bias: 4080. The outer products read k and v (views of the qkv output: what they hold) and write (B, H, L, D, D);
    the cumsum reads and writes it."""
    p, counts, _ = profiled("linear_attention", False)
    qkv, out = 2 * LA_ROWS * LA_W * 3 * LA_W, 2 * LA_ROWS * LA_W * LA_W
    assert by_op(counts)["aten::cumsum"] == LA_OUTER + LA_E
    assert by_op(counts)["aten::bmm"] == 2 * LA_OUTER == 360
    assert p.flops == qkv + 4 * LA_E + 2 * LA_OUTER + 2 * LA_OUTER + 4 * LA_E + out == 4080
    outer = one_row(counts, "aten::mul", ((LA_B, LA_H, LA_L, LA_D, 1), (LA_B, LA_H, LA_L, 1, LA_D)))
    assert (outer.bytes_read, outer.bytes_written) == (2 * LA_E * F32, LA_OUTER * F32)
    scan = one_row(counts, "aten::cumsum", ((LA_B, LA_H, LA_L, LA_D, LA_D),))
    assert (scan.flops, scan.bytes_read, scan.bytes_written) == (LA_OUTER, LA_OUTER * F32, LA_OUTER * F32)


def test_linear_attention_trained_cumsum_backward_is_a_reversed_cumsum():
    """Trained: each cumsum's backward is a cumsum of the flipped gradient (flips move, the cumsum adds); the einsum's
    backward forms both operands' gradients; the qkv projection its weight gradient alone: 6480 of mm and addmm."""
    _, counts, _ = profiled("linear_attention", True)
    assert by_op(counts)["aten::cumsum"] == 2 * (LA_OUTER + LA_E)
    assert by_op(counts)["aten::flip"] == 0 and len(rows_of(counts, "aten::flip")) == 2
    assert by_op(counts)["aten::bmm"] == 3 * 2 * LA_OUTER == 1080
    qkv, out = 2 * LA_ROWS * LA_W * 3 * LA_W, 2 * LA_ROWS * LA_W * LA_W
    assert flops_of(counts, {"aten::mm", "aten::addmm"}) == 2 * qkv + 3 * out == 6480


# --- Glow flow step ------------------------------------------------------------------------------------------------
GL_E = GL_B * GL_C * GL_PIX  # elements of x
GL_HE = GL_E // 2  # of one half
GL_INV = conv(GL_B, GL_C, GL_C, GL_PIX, 1, bias=False)
GL_COUPLING = conv(GL_B, GL_HALF, GL_C, GL_PIX, 9)
GL_LU = 2 * GL_C**3 / 3  # slogdet: an LU of the weight


def test_glow_step_by_hand():
    """ActNorm: add, exp of the C log-scales, multiply; its log-determinant (a sum of C and a scale); the 1x1
    convolution 2*B*C*C*pixels, slogdet of its weight an LU (2C^3/3); the coupling convolution with its bias; +2,
    sigmoid, the shift, the scale, log and its per-sample sum over a half; the two log-determinant adds; y*y and its
    per-sample sum, the half, the subtract, the mean: 3805.67. slogdet reads the CxC weight and writes the sign, the
    log-magnitude, the LU factor and its int32 pivots."""
    p, counts, _ = profiled("glow", False)
    actnorm = 2 * GL_E + GL_C + GL_C + 1
    coupling = GL_COUPLING + 5 * GL_HE + GL_HE + 2
    nll = 2 * GL_E + 3 * GL_B
    assert by_op(counts)["aten::convolution"] == GL_INV + GL_COUPLING == 3240
    assert by_op(counts)["aten::_linalg_slogdet"] == pytest.approx(GL_LU, rel=1e-12)
    assert p.flops == pytest.approx(actnorm + GL_INV + GL_LU + 2 + coupling + nll, rel=1e-12)
    assert p.flops == pytest.approx(3805 + 2 / 3, rel=1e-12)
    lu = one_row(counts, "aten::_linalg_slogdet")
    assert (lu.bytes_read, lu.bytes_written) == (GL_C * GL_C * F32, (2 + GL_C * GL_C) * F32 + GL_C * 4)


def test_glow_step_trained_slogdet_backward_solves_against_the_lu():
    """Trained: slogdet's backward solves with the saved LU factor for the inverse transpose (2 C^2 C, C right-hand
    sides); the 1x1 convolution's input and weight gradients (the ActNorm parameters make x need one); the coupling
    convolution's both gradients and its bias's."""
    _, counts, _ = profiled("glow", True)
    solve = one_row(counts, "aten::linalg_lu_solve")
    assert solve.flops == 2 * GL_C**2 * GL_C == 128
    coupling_bias = GL_B * GL_C * GL_PIX
    assert by_op(counts)["aten::convolution_backward"] == 2 * GL_INV + 2 * (GL_COUPLING - coupling_bias) \
        + coupling_bias == 6408


# --- Gaussian-process marginal likelihood --------------------------------------------------------------------------
GP_PAIRS = GP_N * GP_N


def test_gp_marginal_likelihood_by_hand():
    """The features 2*N*IN*F (bias not counted, as torch's addmm), two scalar exps, the length-scale divide; cdist 3
    per feature of each of the N*N pairs; the square, -0.5*, exp, the noise times eye and the add over N*N; Cholesky
    N^3/3, cholesky_solve 2 N^2 k with k = 1; the data term (multiply, sum, half) and the log-determinant's log and
    sum over the diagonal, the final add: 952. Cholesky writes its factor and an int32 info per matrix."""
    p, counts, _ = profiled("gp", False)
    chol, solve = GP_N**3 / 3, 2 * GP_N**2
    assert one_row(counts, "aten::_cdist_forward").flops == CDIST * GP_PAIRS * GP_F == 432
    assert one_row(counts, "aten::linalg_cholesky_ex").flops == chol == 72
    assert one_row(counts, "aten::cholesky_solve").flops == solve == 72
    assert p.flops == 2 * GP_N * GP_IN * GP_F + 2 + GP_N * GP_F + CDIST * GP_PAIRS * GP_F + 5 * GP_PAIRS + chol \
        + solve + 2 * GP_N + 1 + 2 * GP_N + 1 == 952
    factor = one_row(counts, "aten::linalg_cholesky_ex")
    assert (factor.bytes_read, factor.bytes_written) == (GP_PAIRS * F32, GP_PAIRS * F32 + 4)


def test_gp_trained_cholesky_backward_by_hand():
    """Trained: Cholesky's backward two N x N products and two triangular solves with N right-hand sides (N^2 N
    each); cholesky_solve's backward a second solve; cdist's backward once for each of its two operands (the same
    tensor), as its forward; the features' weight gradient, not the data's."""
    _, counts, _ = profiled("gp", True)
    tri = one_row(counts, "aten::linalg_solve_triangular")
    assert (tri.calls, tri.flops) == (2, 2 * GP_N**3)
    assert one_row(counts, "aten::mm", ((GP_N, GP_N), (GP_N, GP_N))).flops == 2 * 2 * GP_N**3
    assert one_row(counts, "aten::cholesky_solve").flops == 2 * 2 * GP_N**2
    assert one_row(counts, "aten::_cdist_backward").flops == 2 * CDIST * GP_PAIRS * GP_F
    assert one_row(counts, "aten::mm", ((GP_F, GP_N), (GP_N, GP_IN))).flops == 2 * GP_N * GP_IN * GP_F


# --- DGCNN edge convolution ----------------------------------------------------------------------------------------
EC_EDGES = EC_B * EC_N * EC_K


def test_edge_convolution_by_hand():
    """cdist 3 per coordinate of the B*N*N pairs; topk a compare per distance; the gather moves; the neighbour minus
    centre one per element; the shared linear 2*edges*2C*F; ReLU and the max over neighbours one per element: 4860.
    topk writes the k values and int64 indices per point; gather reads one source element per index element, at most
    what the expanded source holds (the B*N*C points), and its index as held (expanded over C: one column)."""
    p, counts, _ = profiled("edgeconv", False)
    linear = 2 * EC_EDGES * 2 * EC_C * EC_F
    assert one_row(counts, "aten::_cdist_forward").flops == CDIST * EC_B * EC_N * EC_N * EC_C == 648
    assert p.flops == CDIST * EC_B * EC_N * EC_N * EC_C + EC_B * EC_N * EC_N + EC_EDGES * EC_C + linear \
        + 2 * EC_EDGES * EC_F == 4860
    top = one_row(counts, "aten::topk")
    assert (top.bytes_read, top.bytes_written) == (EC_B * EC_N * EC_N * F32, EC_B * EC_N * EC_K * (F32 + I64))
    gather = one_row(counts, "aten::gather")
    assert gather.flops == 0
    assert gather.bytes_read == EC_B * EC_N * EC_C * F32 + EC_B * EC_N * EC_K * I64
    assert gather.bytes_written == EC_EDGES * EC_C * F32


def test_edge_convolution_trained_weight_gradient_only():
    """Trained: the linear's weight gradient and bias sum (the points need no gradient: no product for the edges'),
    ReLU's backward, and the max's backward (which elements held it: compare, count, divide, multiply)."""
    _, counts, _ = profiled("edgeconv", True)
    linear = 2 * EC_EDGES * 2 * EC_C * EC_F
    assert flops_of(counts, "aten::mm") == linear
    assert one_row(counts, "aten::threshold_backward").flops == EC_EDGES * EC_F
    assert "aten::_cdist_backward" not in by_op(counts) and "aten::gather_backward" not in by_op(counts)


# --- ESPCN ---------------------------------------------------------------------------------------------------------
SR_PIX, SR_UP = SR_S * SR_S, SR_S * SR_S * SR_R * SR_R
SR_BODY = conv(SR_B, SR_C, SR_W, SR_PIX, 9)
SR_TAIL = conv(SR_B, SR_W, SR_C * SR_R * SR_R, SR_PIX, 9)


def test_espcn_by_hand():
    """The body convolution with its bias (padding's taps counted, as every convolution's), tanh, the tail
    convolution into C r^2 channels; the bicubic skip a multiply-add per tap (16) per output pixel; pixel_shuffle
    moves; the add and the clamp: 8128. pixel_shuffle reads and writes the tail's output once; the bicubic reads the
    low-resolution image and writes the high-resolution one."""
    p, counts, _ = profiled("espcn", False)
    bicubic = 2 * BICUBIC_TAPS * SR_B * SR_C * SR_UP
    assert one_row(counts, "aten::upsample_bicubic2d").flops == bicubic == 2048
    assert p.flops == SR_BODY + SR_B * SR_W * SR_PIX + SR_TAIL + bicubic + 2 * SR_B * SR_C * SR_UP == 8128
    shuffle = one_row(counts, "aten::pixel_shuffle")
    assert (shuffle.flops, shuffle.bytes_read, shuffle.bytes_written) == (0, SR_B * SR_UP * F32, SR_B * SR_UP * F32)
    up = one_row(counts, "aten::upsample_bicubic2d")
    assert (up.bytes_read, up.bytes_written) == (SR_B * SR_PIX * F32, SR_B * SR_UP * F32)


def test_espcn_trained_no_image_gradient():
    """Trained: the tail's input and weight gradients and its bias's; the body's weight and bias gradients only (the
    image needs none); no bicubic backward; the shuffle's backward an unshuffle (data movement)."""
    _, counts, _ = profiled("espcn", True)
    tail_bias = SR_B * SR_C * SR_R * SR_R * SR_PIX  # the body: its weight gradient and bias sum, as its forward
    assert by_op(counts)["aten::convolution_backward"] == 2 * (SR_TAIL - tail_bias) + tail_bias + SR_BODY == 10496
    assert "aten::upsample_bicubic2d_backward" not in by_op(counts)
    assert by_op(counts)["aten::pixel_unshuffle"] == 0
