"""What quantization costs the digits classifier (issue 14's bar: within 0.5 points of test accuracy), per seed,
on the CPU with the reference executor: per mode (int8, fp8, fp8-act) the test-accuracy change in points, how many
test images changed prediction (either way: the noise under the accuracy change) and the largest logit error
relative to the largest logit.

    PYTHONPATH=src python3 scripts/quant_accuracy.py [--seeds 0-9] [--modes int8,fp8,fp8-act]

Each seed trains its own MLP (``tilestack.quant.accuracy.digits_classifier``, a few seconds) and splits the
data its own way (359 test images: one is 0.28 points); fp8-act calibrates on the first 1024 training images in
4 batches of 256, as ``tests/quant/test_quant.py`` does. Prints one row per seed, then the mean and the worst
(the largest loss, the most changed, the largest error) per mode.
"""

from __future__ import annotations

import argparse
import copy

import torch

from tilestack import config, quantize
from tilestack.quant.accuracy import digits_classifier, digits_data, top1

CALIBRATION_IMAGES, CALIBRATION_BATCH = 1024, 256


def seeds(text: str) -> list[int]:
    """'0-9' or '0,3,5' -> a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def measure(seed: int, modes: list[str]) -> dict[str, tuple[float, int, float]]:
    """{mode: (test-accuracy change in points, test images whose prediction changed, largest |logit error| /
    largest |logit|)} for one seed."""
    model, (xt, yt) = digits_classifier(seed=seed)
    base = top1(model, xt, yt)
    (xtr, _), _ = digits_data(seed)
    cal = [xtr[i:i + CALIBRATION_BATCH] for i in range(0, CALIBRATION_IMAGES, CALIBRATION_BATCH)]
    with torch.no_grad():
        logits = model(xt)
    out = {}
    for mode in modes:
        qmodel = quantize(copy.deepcopy(model), mode, calibration=cal if mode == "fp8-act" else None)
        with torch.no_grad():
            qlogits = qmodel(xt)
        changed = int((qlogits.argmax(-1) != logits.argmax(-1)).sum())
        err = float((qlogits - logits).abs().max() / logits.abs().max())
        out[mode] = (100 * (top1(qmodel, xt, yt) - base), changed, err)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--modes", default="int8,fp8,fp8-act")
    args = ap.parse_args()
    modes = args.modes.split(",")
    torch.set_num_threads(1)           # a small MLP: one thread is faster than two on a loaded machine
    rows = {}
    print(f"{'seed':>6} " + " ".join(f"{m + ' pts':>12} {'changed':>8} {m + ' err':>12}" for m in modes))
    with config.override(backend="reference"):
        for seed in seeds(args.seeds):
            rows[seed] = measure(seed, modes)
            print(f"{seed:>6} " + " ".join(f"{rows[seed][m][0]:>+12.2f} {rows[seed][m][1]:>8} "
                                           f"{100 * rows[seed][m][2]:>11.2f}%" for m in modes), flush=True)
    def mean(v):
        return sum(v) / len(v)

    # the worst seed: the largest accuracy loss, the most changed predictions, the largest logit error
    for name, low, high in (("mean", mean, mean), ("worst", min, max)):
        print(f"{name:>6} " + " ".join(f"{low([r[m][0] for r in rows.values()]):>+12.2f} "
                                       f"{high([r[m][1] for r in rows.values()]):>8.1f} "
                                       f"{100 * high([r[m][2] for r in rows.values()]):>11.2f}%" for m in modes))


if __name__ == "__main__":
    main()
