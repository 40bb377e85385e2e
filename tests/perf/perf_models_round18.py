"""Eighteenth round of models the profiler has not seen (tests/perf/test_profile_unseen_round18*.py): real-world model
families written as people write them, from stock torch.nn modules. Each builder returns (model, inputs), seeded,
CPU-sized. ``MODELS`` maps a name to (builder, trainable).

    PYTHONPATH=src python -m tilestack.cli profile tests/perf/perf_models_round18.py:convnext --device cpu --train

The families: a torchvision-style ResNet (a stem with a 3x3 max pool; BasicBlocks of 3x3 convolutions without bias,
BatchNorm2d, an identity shortcut and a strided one with a 1x1 downsample; a global average pool and a linear head)
on a channels_last input, in train mode (batch statistics) and in
eval mode (running statistics); a pre-norm nn.TransformerEncoder (batch_first, norm_first) under a boolean
src_key_padding_mask; an nn.TransformerDecoder under a causal tgt mask (generate_square_subsequent_mask,
tgt_is_causal) over an encoder's memory; a bidirectional two-layer batch_first nn.LSTM over a packed sequence
(pack_padded_sequence, enforce_sorted=False); a two-layer nn.GRU with dropout between its layers; a ConvNeXt block
(depthwise 7x7, LayerNorm after a channels-last permute, an inverted MLP with GELU, layer scale, a residual); a
MobileNetV2 inverted residual (1x1 expand, ReLU6, a depthwise 3x3, a linear 1x1 projection, BatchNorm in eval);
a full nn.Transformer encoder-decoder; a convolutional autoencoder decoding by nn.Upsample(mode='nearest') and
ConvTranspose2d with output_padding; F.scaled_dot_product_attention with is_causal=True and with an (N, N) float
mask broadcast over batch and heads, in fp32 and in bf16; an nn.Embedding + nn.EmbeddingBag(mode='mean')
recommender scoring by a dot product; and a quantization-aware network (torch.ao.quantization.prepare_qat: fused
Conv-BN-ReLU, fake-quantized weights and activations).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).parent))
from profile_support import seeded  # noqa: E402

# ResNet: batch, image channels, block channels, side after the stem, channels after the strided block, classes
RN_BATCH, RN_IN, RN_C, RN_HW, RN_C2, RN_CLASSES = 2, 3, 4, 8, 8, 5
# pre-norm encoder: batch, tokens, width, heads, feed-forward, layers; the second sequence's padded tokens
EN_BATCH, EN_T, EN_DIM, EN_HEADS, EN_FF, EN_LAYERS, EN_PAD = 2, 6, 8, 2, 16, 2, 2
# decoder: batch, target tokens, memory tokens, width, heads, feed-forward, layers
DE_BATCH, DE_T, DE_S, DE_DIM, DE_HEADS, DE_FF, DE_LAYERS = 2, 5, 7, 8, 2, 12, 1
# packed bidirectional LSTM: batch, longest, features, hidden, layers; the sequences' lengths
LS_BATCH, LS_T, LS_IN, LS_HIDDEN, LS_LAYERS, LS_LENGTHS = 3, 6, 4, 5, 2, (6, 3, 4)
# GRU with dropout between layers: batch, tokens, features, hidden, layers, dropout
GR_BATCH, GR_T, GR_IN, GR_HIDDEN, GR_LAYERS, GR_P = 2, 5, 3, 4, 2, 0.5
# ConvNeXt block: batch, channels, side, kernel, MLP ratio
CN_BATCH, CN_C, CN_HW, CN_K, CN_RATIO = 2, 4, 8, 7, 4
# MobileNetV2 inverted residual: batch, channels, side, expansion
MB_BATCH, MB_C, MB_HW, MB_EXPAND = 2, 4, 6, 6
# nn.Transformer: batch, source, target, width, heads, feed-forward, encoder and decoder layers
TF_BATCH, TF_S, TF_T, TF_DIM, TF_HEADS, TF_FF, TF_LAYERS = 2, 6, 4, 8, 2, 16, 1
# autoencoder: batch, channels, side, hidden channels
AE_BATCH, AE_C, AE_HW, AE_HIDDEN = 2, 3, 8, 6
# SDPA: batch, heads, tokens, head dim
SD_BATCH, SD_HEADS, SD_T, SD_D = 2, 2, 8, 4
# recommender: users, items, width, batch, items per bag
RS_USERS, RS_ITEMS, RS_DIM, RS_BATCH, RS_BAG = 10, 20, 4, 3, 4
# QAT: batch, channels in, side, channels, classes
QA_BATCH, QA_C, QA_HW, QA_HIDDEN, QA_CLASSES = 2, 3, 6, 4, 5


def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the identity or a 1x1 strided downsample
    with its BN, then ReLU (in place, as torchvision writes it)."""

    def __init__(self, c_in, c_out, stride=1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnet():
    """Stem (conv3x3 without bias, BN, ReLU, 3x3 max pool stride 2: 16 -> 8), two blocks, global average pool,
    flatten, a linear head; model and input channels_last."""
    model = nn.Sequential(
        conv3x3(RN_IN, RN_C), nn.BatchNorm2d(RN_C), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        BasicBlock(RN_C, RN_C), BasicBlock(RN_C, RN_C2, stride=2),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(RN_C2, RN_CLASSES)).to(memory_format=torch.channels_last)
    x = torch.randn(RN_BATCH, RN_IN, 2 * RN_HW, 2 * RN_HW).to(memory_format=torch.channels_last)
    return model, (x,)


@seeded
def resnet_train():
    model, inputs = _resnet()
    return model.train(), inputs


@seeded
def resnet_eval():
    model, inputs = _resnet()
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), inputs


@seeded
def prenorm_encoder():
    layer = nn.TransformerEncoderLayer(EN_DIM, EN_HEADS, EN_FF, dropout=0.0, batch_first=True, norm_first=True)
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True"
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(layer, EN_LAYERS, norm=nn.LayerNorm(EN_DIM))
    pad = torch.zeros(EN_BATCH, EN_T, dtype=torch.bool)
    pad[1, -EN_PAD:] = True
    return enc.eval(), {"src": torch.randn(EN_BATCH, EN_T, EN_DIM), "src_key_padding_mask": pad}


class CausalDecoder(nn.Module):
    """nn.TransformerDecoder (post-norm, batch_first) under a causal target mask over given memory."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(DE_DIM, DE_HEADS, DE_FF, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, DE_LAYERS)

    def forward(self, tgt, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


@seeded
def causal_decoder():
    return CausalDecoder().eval(), (torch.randn(DE_BATCH, DE_T, DE_DIM), torch.randn(DE_BATCH, DE_S, DE_DIM))


class PackedBiLSTM(nn.Module):
    """A bidirectional two-layer batch_first LSTM over a packed batch (unsorted lengths), padded back, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(LS_IN, LS_HIDDEN, LS_LAYERS, batch_first=True, bidirectional=True)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out


@seeded
def packed_bilstm():
    return PackedBiLSTM(), (torch.randn(LS_BATCH, LS_T, LS_IN), torch.tensor(LS_LENGTHS))


@seeded
def gru_dropout():
    """A two-layer GRU with dropout between its layers, in train mode (the dropout runs)."""
    return nn.GRU(GR_IN, GR_HIDDEN, GR_LAYERS, batch_first=True, dropout=GR_P).train(), (
        torch.randn(GR_BATCH, GR_T, GR_IN),)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7 conv, permute to channels-last, LayerNorm, Linear 4C, GELU, Linear C, layer scale
    gamma, permute back, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(CN_C, CN_C, CN_K, padding=CN_K // 2, groups=CN_C)
        self.norm = nn.LayerNorm(CN_C, eps=1e-6)
        self.pwconv1 = nn.Linear(CN_C, CN_RATIO * CN_C)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(CN_RATIO * CN_C, CN_C)
        self.gamma = nn.Parameter(1e-6 * torch.ones(CN_C))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


@seeded
def convnext():
    return ConvNeXtBlock(), (torch.randn(CN_BATCH, CN_C, CN_HW, CN_HW),)


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN (linear), residual."""

    def __init__(self) -> None:
        super().__init__()
        hidden = MB_C * MB_EXPAND
        self.conv = nn.Sequential(
            nn.Conv2d(MB_C, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, MB_C, 1, bias=False), nn.BatchNorm2d(MB_C))

    def forward(self, x):
        return x + self.conv(x)


@seeded
def mobilenet_v2():
    return InvertedResidual().eval(), (torch.randn(MB_BATCH, MB_C, MB_HW, MB_HW),)


@seeded
def full_transformer():
    model = nn.Transformer(TF_DIM, TF_HEADS, TF_LAYERS, TF_LAYERS, TF_FF, dropout=0.0, batch_first=True)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(TF_T)
    return model.eval(), {"src": torch.randn(TF_BATCH, TF_S, TF_DIM), "tgt": torch.randn(TF_BATCH, TF_T, TF_DIM),
                          "tgt_mask": tgt_mask}


class AutoEncoder(nn.Module):
    """Encoder: conv 3x3 stride 2 + ReLU (8 -> 4), conv 3x3 stride 2 + ReLU (4 -> 2); decoder: nearest Upsample x2
    (2 -> 4) + conv 3x3 + ReLU, ConvTranspose2d 3x3 stride 2 padding 1 output_padding 1 (4 -> 8), sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(AE_C, AE_HIDDEN, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(AE_HIDDEN, AE_HIDDEN, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(AE_HIDDEN, AE_HIDDEN, 3, 1, 1),
                                 nn.ReLU(), nn.ConvTranspose2d(AE_HIDDEN, AE_C, 3, 2, 1, output_padding=1),
                                 nn.Sigmoid())

    def forward(self, x):
        return self.dec(self.enc(x))


@seeded
def autoencoder():
    return AutoEncoder(), (torch.randn(AE_BATCH, AE_C, AE_HW, AE_HW),)


class SDPAMasks(nn.Module):
    """q, k, v by one Linear; F.scaled_dot_product_attention once with is_causal=True and once with an (N, N) float
    mask (an ALiBi-like distance bias) broadcast over batch and heads; the two outputs summed and projected."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        d = SD_HEADS * SD_D
        self.qkv = nn.Linear(d, 3 * d, dtype=dtype)
        self.out = nn.Linear(d, d, dtype=dtype)
        pos = torch.arange(SD_T)
        self.register_buffer("bias", -(pos[:, None] - pos[None, :]).abs().to(dtype) / 4)  # (N, N)

    def forward(self, x):  # (B, N, H*D)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, SD_HEADS, SD_D).permute(2, 0, 3, 1, 4)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        biased = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.out((causal + biased).transpose(1, 2).reshape(b, n, -1))


@seeded
def sdpa_fp32():
    return SDPAMasks(), (torch.randn(SD_BATCH, SD_T, SD_HEADS * SD_D),)


@seeded
def sdpa_bf16():
    return SDPAMasks(torch.bfloat16), (torch.randn(SD_BATCH, SD_T, SD_HEADS * SD_D, dtype=torch.bfloat16),)


class Recommender(nn.Module):
    """A user Embedding, the user's history by EmbeddingBag(mode='mean') (flat indices and offsets), a candidate
    item Embedding; the score is the dot product of (user + history) with the candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(RS_USERS, RS_DIM)
        self.history = nn.EmbeddingBag(RS_ITEMS, RS_DIM, mode="mean")
        self.items = nn.Embedding(RS_ITEMS, RS_DIM)

    def forward(self, user, hist, offsets, item):
        u = self.users(user) + self.history(hist, offsets)  # (B, D)
        return (u * self.items(item)).sum(-1)  # (B,)


@seeded
def recommender():
    user = torch.tensor([1, 4, 7])
    hist = torch.tensor([0, 3, 5, 2, 9, 11, 19, 4, 8])  # bags of 4, 2, 3
    offsets = torch.tensor([0, 4, 6])
    item = torch.tensor([2, 13, 6])
    return Recommender(), (user, hist, offsets, item)


class QATNet(nn.Module):
    """QuantStub, Conv-BN-ReLU (fused for QAT), flatten, Linear, DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(QA_C, QA_HIDDEN, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(QA_HIDDEN)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(QA_HIDDEN * QA_HW * QA_HW, QA_CLASSES)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(x.flatten(1)))


@seeded
def qat():
    model = QATNet().train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    fused = torch.ao.quantization.fuse_modules_qat(model, [["conv", "bn", "relu"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare_qat(fused)
    return prepared, (torch.randn(QA_BATCH, QA_C, QA_HW, QA_HW),)


MODELS = {
    "resnet_train": (resnet_train, True),
    "resnet_eval": (resnet_eval, True),
    "prenorm_encoder": (prenorm_encoder, True),
    "causal_decoder": (causal_decoder, True),
    "packed_bilstm": (packed_bilstm, True),
    "gru_dropout": (gru_dropout, True),
    "convnext": (convnext, True),
    "mobilenet_v2": (mobilenet_v2, True),
    "full_transformer": (full_transformer, True),
    "autoencoder": (autoencoder, True),
    "sdpa_fp32": (sdpa_fp32, True),
    "sdpa_bf16": (sdpa_bf16, True),
    "recommender": (recommender, True),
    "qat": (qat, True),
}
