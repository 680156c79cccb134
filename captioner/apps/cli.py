"""`captioner <command>`: argument parsing only; each command is a function of `captioner.apps.commands`
(`train` and the deprecated `finetune`: `captioner.apps.training`), which calls into the library.

Exit status: 0 success; 1 the job ran but some inputs failed (e.g. unreadable images); 2 bad usage
or unusable inputs (a missing checkpoint, a broken data file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from captioner.apps import commands, training
from captioner.apps.training import OBJECTIVES
from captioner.config import (
    MAX_CONSTRAINTS,
    DecodeConfig,
    FinetuneConfig,
    ModelConfig,
    RerankConfig,
    ScstConfig,
    TrainConfig,
)


def add_decode_arguments(parser: argparse.ArgumentParser, strategy: str = "beam") -> None:
    group = parser.add_argument_group("decoding")
    defaults = DecodeConfig()
    group.add_argument("--strategy", choices=["greedy", "beam", "sample"], default=strategy)
    group.add_argument("--beam-size", type=int, default=defaults.beam_size)
    group.add_argument("--n-best", type=int, default=1, help="captions per image (beam or sample)")
    group.add_argument("--max-length", type=int, default=defaults.max_length)
    group.add_argument("--length-penalty", type=float, default=defaults.length_penalty,
                       help="beam score = log-prob / length**alpha (0 = plain sum)")
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--top-k", type=int, default=defaults.top_k)
    group.add_argument("--top-p", type=float, default=defaults.top_p)
    group.add_argument("--no-repeat-ngram", type=int, default=0, dest="no_repeat_ngram_size")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_concept_arguments(parser)


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("concepts (what the CNN's ImageNet classifier recognises)")
    defaults = DecodeConfig()
    group.add_argument("--concepts", choices=["on", "off"], default="on",
                       help="on: report each photo's confident concepts and make beam search mention them; "
                            "off: plain decoding")
    group.add_argument("--concept-threshold", type=float, default=None, metavar="P",
                       help=f"the least probability of a concept used (default {defaults.concept_threshold})")
    group.add_argument("--max-constraints", type=int, default=None, metavar="N",
                       help=f"the most concepts per photo (0-{MAX_CONSTRAINTS}, default {defaults.max_constraints})")


def add_rerank_arguments(parser: argparse.ArgumentParser, memory_help: str) -> None:
    group = parser.add_argument_group("consensus re-ranking (with a caption memory of training images)")
    defaults = RerankConfig()
    group.add_argument("--memory", default=None, help=memory_help)
    group.add_argument("--rerank-neighbours", type=int, default=defaults.neighbours,
                       help="nearest memory images whose captions vote")
    group.add_argument("--rerank-candidates", type=int, default=defaults.candidates,
                       help="beam size: the candidates re-ranked")
    group.add_argument("--rerank-weight", type=float, default=defaults.model_weight,
                       help="weight of the beam score beside the consensus")



def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    from captioner.images import DEFAULT_MAX_PIXELS, JPEG_HEADER_FACTOR, PROGRESSIVE_JPEG_HEADER_FACTOR

    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"the most pixels decoded per image (default {DEFAULT_MAX_PIXELS:,}: about "
             f"{3 * DEFAULT_MAX_PIXELS / 1e6:,.0f} MB as RGB, a few times that while converting). Larger JPEGs "
             f"are decoded at 1/2, 1/4 or 1/8 scale to fit (up to {JPEG_HEADER_FACTOR}× N pixels in the header, "
             f"{PROGRESSIVE_JPEG_HEADER_FACTOR}× N for progressive JPEGs, whose decoder holds 3-6 bytes per "
             "header pixel); other formats larger than N are refused as possible decompression bombs")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """`captioner train`'s flags. Those that only some objectives use default to None (unset), so that the
    command can refuse one the chosen objective would ignore; unset means the objective's own default."""
    defaults, model, scst, finetune = TrainConfig(), ModelConfig(), ScstConfig(), FinetuneConfig()
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what the run optimises: xe, cross-entropy on cached features (default); scst, self-critical "
                        "CIDEr-D rewards on cached features, from --init-from; finetune, the CNN and the decoder "
                        "together on the images, from --init-from")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this trained checkpoint (its decoder shape and CNN; a feature cache must come "
                        "from that CNN): xe grows it to the new vocabulary; scst and finetune need it")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--features", default=None, help="feature cache made by `captioner features` (xe, scst)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: {defaults.epochs} (xe), {scst.epochs} (scst), {finetune.epochs} (finetune)")
    p.add_argument("--lr", type=float, default=None, help=f"default: {defaults.lr} (xe), {scst.lr} (scst)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"default {defaults.label_smoothing} (xe, finetune)")
    p.add_argument("--patience", type=int, default=None,
                   help=f"epochs without val CIDEr-D gain before stopping (default: {defaults.patience} xe, "
                        f"{scst.patience} scst, {finetune.patience} finetune)")
    p.add_argument("--seed", type=int, default=None, help=f"default {defaults.seed}")
    p.add_argument("--val-images", type=int, default=None, help="score only the first N val images")
    p.add_argument("--val-beam-size", type=int, default=None, help=f"default {defaults.val_decode.beam_size}")
    xe = p.add_argument_group("cross-entropy training (--objective xe)")
    xe.add_argument("--batch-size", type=int, default=None,
                    help=f"captions per update over all processes (under torchrun each takes its share; default "
                         f"{defaults.batch_size})")
    xe.add_argument("--min-word-count", type=int, default=None, help=f"default {defaults.min_word_count}")
    xe.add_argument("--ema-decay", type=float, default=None,
                    help="> 0: validate and keep an exponential moving average of the weights with this decay "
                         "per update (e.g. 0.999); the raw weights are scored too, as val_raw in log.jsonl")
    xe.add_argument("--embed-dim", type=int, default=None, help=f"default {model.embed_dim}")
    xe.add_argument("--hidden-dim", type=int, default=None, help=f"default {model.hidden_dim}")
    xe.add_argument("--image-dim", type=int, default=None, help=f"default {model.image_dim}")
    xe.add_argument("--layers", type=int, default=None, help=f"default {model.num_layers}")
    xe.add_argument("--dropout", type=float, default=None, help=f"default {model.dropout}")
    xe.add_argument("--image-input", choices=["every", "first"], default=None, help=f"default {model.image_input}")
    xe.add_argument("--device", default=None,
                    help="auto (default), cpu or cuda (under torchrun: cuda:LOCAL_RANK); scst and finetune run on "
                         "the CPU")
    xe.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                    help="mixed precision: bf16 or fp16 (with loss scaling) on CUDA; bf16 also runs on the CPU")
    xe.add_argument("--text-corpus", default=None,
                    help="also train on these captions (a folder like ../shared/data/coco-text, its JSON file, or "
                         "a text file with one caption per line), each with a pseudo image vector from the CNN's "
                         "ImageNet head for the concepts it names; its words join the vocabulary")
    xe.add_argument("--pseudo-target-p", type=float, default=None,
                    help="how strongly a pseudo vector shows its concepts: the ImageNet head's probability of them "
                         "(default 0.6)")
    group = p.add_argument_group("self-critical fine-tuning (--objective scst; reward = CIDEr-D)")
    group.add_argument("--scst", action="store_true", help="deprecated spelling of --objective scst")
    group.add_argument("--scst-samples", type=int, default=None,
                       help=f"sampled captions per image (default {scst.samples_per_image})")
    group.add_argument("--scst-batch-images", type=int, default=None,
                       help=f"images per update (default {scst.batch_images})")
    group.add_argument("--scst-baseline", choices=["mean", "greedy"], default=None,
                       help=f"mean reward of the other samples, or the greedy caption's reward (default {scst.baseline})")
    group.add_argument("--scst-candidates", choices=["sample", "beam"], default=None,
                       help="the captions rewarded: sampled, or each image's best beams (beam size "
                            f"--scst-samples, mean baseline; default {scst.candidates})")
    group.add_argument("--scst-dropout", type=float, default=None,
                       help="dropout rate while sampling (default: the XE model's own)")
    add_finetune_arguments(p.add_argument_group("CNN fine-tuning (--objective finetune, on the images)"))


def add_finetune_arguments(group: Any) -> None:  # a parser or an argument group
    defaults = FinetuneConfig()
    group.add_argument("--batch-images", type=int, default=None,
                       help=f"images per step, each with all its captions (default {defaults.batch_images})")
    group.add_argument("--encoder-lr", type=float, default=None, help=f"default {defaults.encoder_lr}")
    group.add_argument("--decoder-lr", type=float, default=None, help=f"default {defaults.decoder_lr}")
    group.add_argument("--warmup-steps", type=int, default=None, help=f"default {defaults.warmup_steps}")
    group.add_argument("--no-flip", action="store_true", help="no random horizontal flips of training images")
    group.add_argument("--train-images", type=int, default=None, help="train on the first N images (smoke runs)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", required=required,
                        help="dataset folder or annotation file (Karpathy json, COCO captions json, or "
                             "Flickr8k.token.txt)")
    parser.add_argument("--layout", choices=["auto", "karpathy", "coco", "flickr8k"], default="auto")
    parser.add_argument("--images", default=None, help="image folder, when not beside the annotations")
    parser.add_argument("--karpathy-split", default=None,
                        help="COCO only: a Karpathy dataset_coco.json assigning train/val/test")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid entries of the data files (reported with counts) instead of stopping")



def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__

    parser = argparse.ArgumentParser(prog="captioner", description="Caption images with a CNN + LSTM model.")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = subcommands.add_parser("caption", help="caption image files, folders and globs")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", default=None, help="default: the shipped Flickr8k checkpoint")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--output", "-o", default=None, help="results file: .jsonl, .csv or .json (default: print)")
    p.add_argument("--resume", action="store_true",
                   help="continue --output: skip the images captioned there, try again those that failed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--batch-size", type=int, default=32, help="images per CNN batch")
    p.add_argument("--decode-batch-size", type=int, default=128,
                   help="images decoded together (batched beam search is faster on bigger batches); results are "
                        "written after each such group")
    p.add_argument("--workers", type=int, default=None,
                   help="image loading processes (default: chosen for the device)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_image_arguments(p)
    add_decode_arguments(p)
    add_rerank_arguments(p, "a caption memory (`captioner memory`): re-rank beam candidates by consensus")
    p.set_defaults(func=commands.cmd_caption)

    p = subcommands.add_parser("evaluate", help="score a checkpoint on a dataset split (BLEU, CIDEr-D, ROUGE-L)")
    p.add_argument("--checkpoint", default=None, nargs="+",
                   help="a checkpoint; several are decoded jointly as an ensemble (one shared vocabulary); "
                        "default: the shipped Flickr8k checkpoint")
    add_data_arguments(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--features", default=None, nargs="+",
                   help="feature cache(s) to read instead of running the CNN; each checkpoint reads the one its "
                        "encoder made")
    p.add_argument("--out", default=None, help="folder for the report, predictions and HTML page")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--coco-eval", action="store_true", help="also run pycocoevalcap's COCOEvalCap (needs Java)")
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    add_image_arguments(p)
    add_decode_arguments(p)
    add_rerank_arguments(p, "re-rank beam candidates by consensus with a caption memory: a file made by "
                            "`captioner memory`, or 'train' to build one from --data's train split")
    p.set_defaults(func=commands.cmd_evaluate)

    p = subcommands.add_parser("memory", help="build a caption memory (training images' features and captions) "
                                           "for consensus re-ranking")
    add_data_arguments(p)
    p.add_argument("--checkpoint", default=None, help="whose CNN makes the features (default: the shipped Flickr8k checkpoint)")
    p.add_argument("--split", default="train", help="the images to remember (never the split you evaluate on)")
    p.add_argument("--features", default=None, nargs="+", help="feature cache(s) of that CNN, instead of running it")
    p.add_argument("--out", required=True, help="the memory file (.safetensors); it holds the dataset's captions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=commands.cmd_memory)

    p = subcommands.add_parser("features", help="compute and cache CNN features for a dataset")
    add_data_arguments(p)
    p.add_argument("--encoder", default=None, help="default: efficientnet_lite0")
    p.add_argument("--encoder-weights", default=None, help="a local weights file for the encoder")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="use the CNN this checkpoint was trained with (its own, if fine-tuned) instead of --encoder")
    p.add_argument("--from-checkpoint", default=None, metavar="CKPT", help="deprecated spelling of --checkpoint")
    p.add_argument("--allow-random-weights", action="store_true", help="testing only: untrained CNN")
    p.add_argument("--out", required=True, help="cache folder (resumed if it exists)")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image loading processes (default: chosen for the device)")
    p.add_argument("--device", default="auto")
    add_image_arguments(p)
    p.set_defaults(func=commands.cmd_features)

    p = subcommands.add_parser("train", help="train a decoder: cross-entropy on cached features (default), SCST, "
                                          "or fine-tuning the CNN with it")
    add_data_arguments(p)
    add_train_arguments(p)
    p.set_defaults(func=training.cmd_train)

    p = subcommands.add_parser("finetune", help="deprecated: `captioner train --objective finetune --init-from CKPT`")
    p.add_argument("checkpoint", help="the trained checkpoint to start from (--init-from)")
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="run folder (best/last checkpoints, log, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-images", type=int, default=None)
    p.add_argument("--val-beam-size", type=int, default=None)
    add_finetune_arguments(p.add_argument_group("CNN fine-tuning"))
    p.set_defaults(func=training.cmd_finetune)

    p = subcommands.add_parser("demo", help="start the Gradio web demo (also: python demo/app.py)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file or folder (default: the shipped Flickr8k model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 makes the demo reachable from other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_image_arguments(p)
    add_concept_arguments(p)
    add_rerank_arguments(p, "a caption memory (`captioner memory`): beam search re-ranks its candidates by consensus")
    p.set_defaults(func=commands.cmd_demo)

    p = subcommands.add_parser("info", help="print a checkpoint's settings and scores")
    p.add_argument("checkpoint")
    p.set_defaults(func=commands.cmd_info)
    return parser



def main(argv: list[str] | None = None) -> int:
    from captioner.checkpoint import CheckpointError
    from captioner.data.records import DataFormatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DataFormatError, FileNotFoundError, ValueError) as error:
        print(f"captioner {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"captioner {args.command}: interrupted", file=sys.stderr)
        return 130
