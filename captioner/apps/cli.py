"""`captioner <command>`: argument parsing only; each command is a function of `captioner.apps.commands`
(`train` and the deprecated `finetune`: `captioner.apps.training`), which calls into the library.

Exit status: 0 success; 1 the job ran but some inputs failed (e.g. unreadable images); 2 bad usage
or unusable inputs (a missing checkpoint, a broken data file, a run folder that would be overwritten), in
one line naming the file, the problem and the fix; 130 interrupted (Ctrl-C), with the command that
continues where a command can resume.

`--help` shows every option's default (`DefaultsHelpFormatter`).
"""

from __future__ import annotations

import argparse
import errno
import shlex
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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default: "(default: X)" is added unless the help already says one.
    Switches (store_true) are off by default and say nothing; an option whose default is None must say
    in its help what not giving it means (tests/test_cli_doors.py checks every command)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default in (None, argparse.SUPPRESS)
                or action.nargs == 0 or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """The command line's parsers (the commands' too: subparsers take their parent's class): defaults shown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


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
    group.add_argument("--seed", type=int, default=None, help="seed for sampling (default: none, a new draw each run)")
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
    group.add_argument("--memory", default=None, help=f"{memory_help} (default: none, no re-ranking)")
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
                   help="start from this trained checkpoint (a file, or a run folder: its best; its decoder shape "
                        "and CNN; a feature cache must come from that CNN): xe grows it to the new vocabulary; scst "
                        "and finetune need it (default: none, a new decoder)")
    add_run_folder_arguments(p)
    p.add_argument("--features", default=None,
                   help="feature cache made by `captioner features` (xe and scst need it; default: none)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: {defaults.epochs} (xe), {scst.epochs} (scst), {finetune.epochs} (finetune)")
    p.add_argument("--lr", type=float, default=None, help=f"default: {defaults.lr} (xe), {scst.lr} (scst)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"default {defaults.label_smoothing} (xe, finetune)")
    p.add_argument("--patience", type=int, default=None,
                   help=f"epochs without val CIDEr-D gain before stopping (default: {defaults.patience} xe, "
                        f"{scst.patience} scst, {finetune.patience} finetune)")
    p.add_argument("--seed", type=int, default=None, help=f"default {defaults.seed}")
    p.add_argument("--val-images", type=int, default=None, help="score only the first N val images (default: all)")
    p.add_argument("--val-beam-size", type=int, default=None, help=f"default {defaults.val_decode.beam_size}")
    xe = p.add_argument_group("cross-entropy training (--objective xe)")
    xe.add_argument("--batch-size", type=int, default=None,
                    help=f"captions per update over all processes (under torchrun each takes its share; default "
                         f"{defaults.batch_size})")
    xe.add_argument("--min-word-count", type=int, default=None, help=f"default {defaults.min_word_count}")
    xe.add_argument("--ema-decay", type=float, default=None,
                    help="> 0: validate and keep an exponential moving average of the weights with this decay "
                         "per update (e.g. 0.999); the raw weights are scored too, as val_raw in log.jsonl "
                         f"(default: {defaults.ema_decay}, no average)")
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
                    help="mixed precision: bf16 or fp16 (with loss scaling) on CUDA; bf16 also runs on the CPU "
                         "(default: none, float32)")
    xe.add_argument("--text-corpus", default=None,
                    help="also train on these captions (a folder like ../shared/data/coco-text, its JSON file, or "
                         "a text file with one caption per line), each with a pseudo image vector from the CNN's "
                         "ImageNet head for the concepts it names; its words join the vocabulary (default: none)")
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
    group.add_argument("--train-images", type=int, default=None,
                       help="train on the first N images (smoke runs; default: all)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, and what to do when it holds a run: nothing is replaced unless asked."""
    parser.add_argument("--out", required=True, help="run folder (best/last checkpoints, log, curves)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last finished epoch (with the settings it was "
                             "started with)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run --out holds (without --resume or --overwrite, a folder holding a "
                             "run is refused)")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--data", required=required,
                        help="dataset folder or annotation file (Karpathy json, COCO captions json, or "
                             "Flickr8k.token.txt)")
    parser.add_argument("--layout", choices=["auto", "karpathy", "coco", "flickr8k"], default="auto",
                        help="the annotations' format (auto: detected from the file names and contents)")
    parser.add_argument("--images", default=None,
                        help="image folder (default: images/ beside the annotations, else their folder)")
    parser.add_argument("--karpathy-split", default=None,
                        help="COCO only: a Karpathy dataset_coco.json assigning train/val/test (default: none, each "
                             "file's split from its name)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid entries of the data files (reported with counts) instead of stopping")



def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__

    parser = Parser(prog="captioner", description="Caption images with a CNN + LSTM model.")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # each a Parser

    p = subcommands.add_parser("caption", help="caption image files, folders and globs")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint file, or a folder holding one (a run folder: its best) (default: the shipped "
                        "checkpoint)")
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
                   help="a checkpoint file or folder (a run folder: its best); several are decoded jointly as an "
                        "ensemble (one shared vocabulary) (default: the shipped checkpoint)")
    add_data_arguments(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--features", default=None, nargs="+",
                   help="feature cache(s) to read instead of running the CNN; each checkpoint reads the one its "
                        "encoder made (default: none, run the CNN)")
    p.add_argument("--out", default=None,
                   help="folder for the report, predictions and HTML page (default: none, print the table only)")
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
    p.add_argument("--checkpoint", default=None,
                   help="whose CNN makes the features: a checkpoint file or folder (default: the shipped checkpoint)")
    p.add_argument("--split", default="train", help="the images to remember (never the split you evaluate on)")
    p.add_argument("--features", default=None, nargs="+",
                   help="feature cache(s) of that CNN, instead of running it (default: none, run the CNN)")
    p.add_argument("--out", required=True, help="the memory file (.safetensors); it holds the dataset's captions")
    p.add_argument("--overwrite", action="store_true", help="replace the file --out names (else it is refused)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=commands.cmd_memory)

    p = subcommands.add_parser("features", help="compute and cache CNN features for a dataset")
    add_data_arguments(p)
    p.add_argument("--encoder", default=None, help="default: efficientnet_lite0")
    p.add_argument("--encoder-weights", default=None,
                   help="a local weights file for the encoder (default: its packaged ImageNet weights)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="use the CNN this checkpoint was trained with (its own, if fine-tuned) instead of --encoder "
                        "(default: none, --encoder)")
    p.add_argument("--from-checkpoint", default=None, metavar="CKPT",
                   help="deprecated spelling of --checkpoint (default: none)")
    p.add_argument("--allow-random-weights", action="store_true", help="testing only: untrained CNN")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted extraction in --out, or add the images a finished cache there lacks")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the cache --out holds (without --resume or --overwrite, a folder holding one is "
                        "refused)")
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
    finetune = FinetuneConfig()
    p.add_argument("checkpoint", help="the trained checkpoint to start from (--init-from)")
    add_data_arguments(p)
    add_run_folder_arguments(p)
    p.add_argument("--epochs", type=int, default=None, help=f"default {finetune.epochs}")
    p.add_argument("--label-smoothing", type=float, default=None, help=f"default {finetune.label_smoothing}")
    p.add_argument("--patience", type=int, default=None, help=f"default {finetune.patience}")
    p.add_argument("--seed", type=int, default=None, help=f"default {finetune.seed}")
    p.add_argument("--val-images", type=int, default=None, help="score only the first N val images (default: all)")
    p.add_argument("--val-beam-size", type=int, default=None, help=f"default {finetune.val_decode.beam_size}")
    add_finetune_arguments(p.add_argument_group("CNN fine-tuning"))
    p.set_defaults(func=training.cmd_finetune)

    p = subcommands.add_parser("demo", help="start the Gradio web demo (also: python demo/app.py)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file or folder (a run folder: its best) (default: the shipped checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 makes the demo reachable from other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_image_arguments(p)
    add_concept_arguments(p)
    add_rerank_arguments(p, "a caption memory (`captioner memory`): beam search re-ranks its candidates by consensus")
    p.set_defaults(func=commands.cmd_demo)

    p = subcommands.add_parser("info", help="a checkpoint's summary: its model, what it was trained on, its val "
                                         "scores and the decoding defaults")
    p.add_argument("checkpoint", help="a checkpoint file or folder (a run folder: its best)")
    p.add_argument("--json", action="store_true", help="print everything the checkpoint records, as JSON")
    p.set_defaults(func=commands.cmd_info)
    for command in subcommands.choices.values():  # argparse shows no help line for an option without help text
        for action in command._actions:
            if action.help is None and action.option_strings and action.default is not None and action.nargs != 0:
                action.help = "default: %(default)s"
    return parser



OS_ERROR_FIXES = {  # errno name -> what to do, after the file and the reason
    "ENOSPC": "; free some space, then run the command again", "EDQUOT": "; free some space, then run it again",
    "EACCES": "; write somewhere you may, or change the permissions", "EPERM": "; write somewhere you may",
    "EROFS": "; the filesystem is read-only: write somewhere else",
    "ENOTDIR": "; a part of the path is a file, not a folder: check the path",
}
RESUMABLE = {"train": "the epochs finished so far are saved in --out",
             "finetune": "the epochs finished so far are saved in --out",
             "features": "the features computed so far are kept in --out"}


def interrupted_message(command: str, argv: list[str]) -> str:
    """What Ctrl-C prints: for a command that resumes, what is kept and the exact rerun that continues."""
    if command not in RESUMABLE:
        return f"captioner {command}: interrupted"
    rerun = [arg for arg in argv if arg != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    return f"captioner {command}: interrupted; {RESUMABLE[command]}; continue with: captioner {shlex.join(rerun)}"


def main(argv: list[str] | None = None) -> int:
    from captioner.checkpoint import CheckpointError
    from captioner.data.records import DataFormatError
    from captioner.encoders.weights import EncoderUnavailableError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DataFormatError, FileNotFoundError, EncoderUnavailableError, ValueError) as error:
        print(f"captioner {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that cannot be written, a full disk: the file and the reason
        where = f"{error.filename}: " if error.filename else ""
        fix = OS_ERROR_FIXES.get(errno.errorcode.get(error.errno or 0, ""), "")
        print(f"captioner {args.command}: error: {one_line(f'{where}{error.strerror or error}{fix}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(args.command, argv), file=sys.stderr)
        return 130


def one_line(error: BaseException | str) -> str:
    """The error's message on one terminal line: line breaks and what else is not printable (in a file name,
    say) escaped (`utils.printable`)."""
    from captioner.utils import printable

    return printable(str(error).strip())
