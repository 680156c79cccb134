"""Our EfficientNet-Lite against timm's, side by side: images/s of the CNN forward at batch 32 and 64.

    python scripts/bench/encoder_timm.py [--encoder efficientnet_lite0] [--rounds 7] [--batches 4] [--threads N]

Both networks get the same weights (the packaged ImageNet file, keys converted to timm's names), the same
BatchNorm folding (`captioner.encoders.fusing.fused_copy_if_equivalent`, which folds timm's BatchNormAct2d
too) and the same input: normalised float32 batches, channels-last as the loader gives them on the CPU,
under inference_mode. Ours is `get_encoder(...)`, the module every door runs; timm's is
`timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)` (pooled features, no
classifier), loaded strictly. The two alternate within every round; each figure is the median over the
rounds (this machine may be shared), and the ratio is taken per round. The features are compared first.
Needs timm (a dev dependency).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from captioner.encoders import get_encoder, get_encoder_spec
from captioner.encoders.efficientnet_lite import (
    LITE0_STAGE_DEPTHS,
    LITE2_STAGE_DEPTHS,
    convert_lite_state_dict,
    lite0_packaged_weights,
    lite2_packaged_weights,
)
from captioner.encoders.fusing import fused_copy_if_equivalent
from captioner.encoders.weights import load_strict, weights_state

TIMM = {"efficientnet_lite0": ("tf_efficientnet_lite0", lite0_packaged_weights, LITE0_STAGE_DEPTHS),
        "efficientnet_lite2": ("tf_efficientnet_lite2", lite2_packaged_weights, LITE2_STAGE_DEPTHS)}


def timm_encoder(name: str) -> torch.nn.Module:
    """timm's network with our packaged weights, pooled features out, BatchNorm folded as ours is."""
    import timm

    timm_name, packaged, depths = TIMM[name]
    model = timm.create_model(timm_name, pretrained=False).eval()
    load_strict(model, convert_lite_state_dict(weights_state(packaged()), depths), f"timm {timm_name}")
    model.reset_classifier(0)  # (B, 1280) pooled features, as our encoder gives
    model.requires_grad_(False)
    return fused_copy_if_equivalent(model, get_encoder_spec(name).input_size)


def images_per_second(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for images in batches:
            model(images)
    return sum(len(images) for images in batches) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=sorted(TIMM), default="efficientnet_lite0")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batches", type=int, default=4, help="timed batches per network per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ours = get_encoder(args.encoder).model  # fused, as every door runs it
    theirs = timm_encoder(args.encoder)
    size = get_encoder_spec(args.encoder).input_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(4, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        difference = (ours(probe) - theirs(probe)).abs().max().item()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.encoder} at {size} px, BatchNorm folded in both, channels-last")
    print(f"features: largest difference ours vs timm {difference:.2e} on 4 random images")
    print(f"{'batch':>5} {'ours img/s':>11} {'timm img/s':>11} {'timm / ours':>12}   (medians of {args.rounds} rounds)")
    for batch_size in args.batch_sizes:
        batches = [torch.randn(batch_size, 3, size, size, generator=generator)
                   .contiguous(memory_format=torch.channels_last) for _ in range(args.batches)]
        images_per_second(ours, batches[:1])  # warm-up
        images_per_second(theirs, batches[:1])
        figures: dict[str, list[float]] = {"ours": [], "timm": []}
        for round_number in range(args.rounds):
            order = ("ours", "timm") if round_number % 2 == 0 else ("timm", "ours")
            for name in order:
                figures[name].append(images_per_second(ours if name == "ours" else theirs, batches))
        ratios = [t / o for o, t in zip(figures["ours"], figures["timm"], strict=True)]
        print(f"{batch_size:>5} {statistics.median(figures['ours']):11.1f} {statistics.median(figures['timm']):11.1f} "
              f"{statistics.median(ratios):12.3f}   (per round {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
