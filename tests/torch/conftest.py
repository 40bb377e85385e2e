"""torch.compile and torch.library.opcheck import torch._dynamo, which imports Triton; on a machine without a
GPU, Triton must have been imported with its interpreter on for tilestack's Triton backend to run (see
tilestack.config.use_triton_interpreter). Turn it on while collecting, before any test can import Triton."""

import sys

import torch

from tilestack import config

if not torch.cuda.is_available() and "triton" not in sys.modules:
    config.use_triton_interpreter()
