"""What each `captioner` command does with its parsed flags: turn them into the library's settings and call
the library. Heavy modules (torch and what needs it) are imported inside the commands, so that
`captioner --help` starts fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from captioner.config import (
    DecodeConfig,
    RerankConfig,
)


def deprecated(command: str, old: str, new: str) -> None:
    """The one-line notice an old spelling of a flag or command prints (it still works)."""
    print(f"captioner {command}: {old} is deprecated; use {new}", file=sys.stderr)


def rerank_config(args: argparse.Namespace) -> RerankConfig | None:
    return RerankConfig.from_command(vars(args))


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    """The DecodeConfig of a command's flags; `--concepts off` sets concept_threshold to None."""
    config = DecodeConfig.from_flags(vars(args))
    if getattr(args, "concepts", "on") == "off":
        if getattr(args, "concept_threshold", None) is not None:
            raise ValueError("--concept-threshold chooses the concepts used; it does not go with --concepts off")
        config = replace(config, concept_threshold=None)
    return config



def load_data(args: argparse.Namespace):
    from captioner import distributed
    from captioner.data import load_dataset

    dataset = load_dataset(args.data, layout=args.layout, images_dir=args.images,
                           skip_invalid=args.skip_invalid, karpathy_split=args.karpathy_split)
    if dataset.report and distributed.is_main():  # once per torchrun group
        print(dataset.report.summary(), file=sys.stderr)
    return dataset




def cmd_features(args: argparse.Namespace) -> int:
    from captioner import distributed
    from captioner.features import extract_features, feature_run_encoder
    from captioner.features.cache import check_cache_folder, clear_cache_folder
    from captioner.utils import resolve_device

    checkpoint = args.checkpoint
    if args.from_checkpoint:
        deprecated("features", "--from-checkpoint", "--checkpoint")
        if checkpoint:
            raise ValueError("--from-checkpoint is the old spelling of --checkpoint; give one of them")
        checkpoint = args.from_checkpoint
    device = resolve_device(args.device)
    with distributed.session(device, backend="gloo"):  # under torchrun: one shard of the images per rank
        check_cache_folder(args.out, args.resume, args.overwrite)  # before the data: every rank refuses alike
        dataset = load_data(args)
        splits = args.splits.split(",")
        records = [r for r in dataset.records if r.split in splits]
        encoder = feature_run_encoder(args.encoder, args.encoder_weights, args.allow_random_weights, checkpoint)
        distributed.barrier()  # every rank has looked before rank 0 clears anything
        if args.overwrite and distributed.is_main() and (removed := clear_cache_folder(args.out)):
            print(f"--overwrite: removed the previous cache's {', '.join(removed)} from {args.out}", file=sys.stderr)
        distributed.barrier()
        cache = extract_features(records, encoder, args.out, batch_size=args.batch_size,
                                 num_workers=args.workers, device=device, max_pixels=args.max_pixels)
        distributed.print0(f"{len(cache)} image features in {args.out}")
    return 1 if cache.meta.get("failed") else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os

    from captioner.checkpoint import default_checkpoint_path
    from captioner.evaluation.evaluate import EvaluationSettings, evaluate_checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("evaluate runs in one process; start it without torchrun")
    rerank = rerank_config(args)
    dataset = load_data(args)
    dataset.require_split(args.split, split_flag="--split")  # before loading the model: a split the data lacks
    checkpoints = args.checkpoint or [default_checkpoint_path()]
    settings = EvaluationSettings(out_dir=args.out, features_dirs=tuple(args.features or ()),
                                  batch_size=args.batch_size, device=args.device, coco_eval=args.coco_eval,
                                  html=not args.no_html, memory=args.memory, rerank=rerank,
                                  max_pixels=args.max_pixels)
    report = evaluate_checkpoint(checkpoints, dataset, args.split, decode_config(args), settings)
    return 1 if report["skipped_images"] else 0


def cmd_caption(args: argparse.Namespace) -> int:
    from captioner import distributed
    from captioner.api import Captioner
    from captioner.apps.batch import BatchOptions, caption_paths, caption_paths_sharded, check_sharded
    from captioner.apps.inputs import expand_inputs
    from captioner.apps.outputs import check_output
    from captioner.utils import printable, resolve_device

    config, rerank = decode_config(args), rerank_config(args)
    options = BatchOptions(output=args.output, recursive=args.recursive, resume=args.resume, overwrite=args.overwrite,
                           batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
                           num_workers=args.workers)
    try:
        with distributed.session(resolve_device(args.device), backend="gloo"):
            if distributed.is_distributed():  # under torchrun: one shard per rank, merged by rank 0
                check_sharded(args.output, args.memory)
                captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, max_pixels=args.max_pixels)
                return caption_paths_sharded(args.paths, captioner, config, options)
        # Before loading the model: refuse an output that would be overwritten or cannot be written, and
        # inputs that name no image.
        if args.output:
            check_output(args.output, args.resume, args.overwrite)
        scan = expand_inputs(args.paths, args.recursive).require_images()
        captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, memory=args.memory,
                                              rerank=rerank, max_pixels=args.max_pixels)
        return caption_paths(scan, captioner, config, options)
    except KeyboardInterrupt:
        if not args.output:
            print("captioner caption: interrupted; to continue an interrupted run later, write the results to a "
                  "file with --output and rerun with --resume", file=sys.stderr)
        else:
            print(printable(f"captioner caption: interrupted; continue with: {resume_command(args)}"), file=sys.stderr)
        return 130


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues an interrupted `captioner caption` run: the one typed, with --resume
    (and without --overwrite). When this process was not started as that command (`main` called from
    Python), its paths and output with --resume, and the note that the other options go with them."""
    typed, note = sys.argv[1:], ""
    if typed[:1] != ["caption"]:
        typed, note = ["caption", *args.paths, "--output", str(args.output)], " (with the same other options)"
    rerun = [arg for arg in typed if arg != "--overwrite"]
    if "--resume" not in rerun:
        rerun.append("--resume")
    return shlex.join(["captioner", *rerun]) + note


def cmd_demo(args: argparse.Namespace) -> int:
    from captioner.apps.demo import launch

    # the server's decoding settings (the concept flags); strategy, beam size, ... are each visitor's
    launch(args.checkpoint, host=args.host, port=args.port, share=args.share,
           memory=args.memory, rerank=rerank_config(args), max_pixels=args.max_pixels, decoding=decode_config(args))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from captioner.checkpoint import default_checkpoint_path, load_checkpoint
    from captioner.decoding.memory import build_memory
    from captioner.utils import resolve_device

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"{out}: a folder; give the memory's file name as --out (e.g. {out / 'memory.safetensors'})")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: a file is already there; replace it with --overwrite, or give another --out")
    dataset = load_data(args)
    dataset.require_split(args.split, split_flag="--split")
    checkpoint = load_checkpoint(args.checkpoint or default_checkpoint_path())
    memory = build_memory(dataset, args.split, checkpoint, args.features or [], args.batch_size,
                          resolve_device(args.device))
    out.parent.mkdir(parents=True, exist_ok=True)
    memory.save(out)
    captions = sum(len(texts) for texts in memory.captions)
    print(f"caption memory of {len(memory)} {args.split} images ({captions} captions) for {checkpoint.path}: {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from captioner.checkpoint import load_checkpoint, portable_info

    checkpoint = load_checkpoint(args.checkpoint)
    if args.json:  # what the file records (paths of the machine that wrote it as folder and name)
        print(json.dumps({"path": str(checkpoint.path), "config": checkpoint.model.config.__dict__,
                          "vocab_size": len(checkpoint.vocab), "encoder": checkpoint.encoder,
                          "info": portable_info(checkpoint.info)}, indent=2))
    else:
        print(checkpoint_summary(checkpoint))
    return 0


# info entry -> the objective that wrote it ("fine_tune": an older `captioner finetune`), most specific first
OBJECTIVE_NAMES = (("finetune_config", "CNN fine-tuning"), ("fine_tune", "CNN fine-tuning"), ("scst_config", "SCST"),
                   ("train_config", "cross-entropy"))
FINETUNE_ENTRIES = ("finetune_config", "fine_tune", "fine_tuned_from", "epoch", "init_checkpoint", "train_images")


def earlier_stage(info: dict) -> dict | None:
    """The info of the run a checkpoint's run started from: its `init_info`; CNN fine-tuning keeps its start's
    entries beside its own instead, so that stage is what remains without them."""
    if any(isinstance(info.get(key), dict) for key in ("finetune_config", "fine_tune")):
        return {key: value for key, value in info.items() if key not in FINETUNE_ENTRIES}
    return info.get("init_info") if isinstance(info.get("init_info"), dict) else None


def training_stage(info: dict) -> str:
    """One stage of a checkpoint's training, from its info: the objective, epochs, data, start."""
    from captioner.checkpoint import portable_path

    kind, config = next(((name, info[key]) for key, name in OBJECTIVE_NAMES if isinstance(info.get(key), dict)),
                        ("training", {}))
    parts = [kind]
    if "epoch" not in info and "epochs" in config:
        parts.append(f"{config['epochs']} epochs planned")
    if "epoch" in info:
        parts.append(f"epoch {info['epoch']}" + (f" of {config['epochs']}" if "epochs" in config else ""))
    data = info.get("data")
    counts = [f"{info[key]:,} {noun}" for key, noun in (("train_images", "images"), ("train_captions", "captions"))
              if isinstance(info.get(key), int)]
    if data:
        parts.append(f"on {data}" + (f" ({', '.join(counts)})" if counts else ""))
    elif counts:
        parts.append("on " + ", ".join(counts))
    if "+text:" in str(info.get("data_fingerprint", "")) and "+" not in str(data or ""):
        parts.append("with a text corpus (captions without photos)")
    if "seed" in info:
        parts.append(f"seed {info['seed']}")
    if info.get("init_checkpoint"):
        parts.append(f"from {portable_path(info['init_checkpoint'])}")
    return ", ".join(parts)


RESIZED = {"squash": "squashed", "shorter_side_crop": "centre-cropped"}


def checkpoint_summary(checkpoint) -> str:
    """`captioner info`: a few lines on what a checkpoint is, how it was trained and how well it did."""
    from captioner.config import DecodeConfig
    from captioner.model import count_parameters

    config, info, encoder = checkpoint.model.config, checkpoint.info, checkpoint.encoder
    lines = [str(checkpoint.path)]
    layers = f"{config.num_layers} layer" + ("s" if config.num_layers > 1 else "")
    lines.append(f"  decoder   LSTM, {layers} of {config.hidden_dim}, embedding {config.embed_dim}, image projection "
                 f"{config.image_dim} (image input: {config.image_input}); {len(checkpoint.vocab):,} words; "
                 f"{count_parameters(checkpoint.model) / 1e6:.2f}M parameters")
    preprocessing = encoder.get("preprocessing") or {}
    size = preprocessing.get("input_size")
    lines.append(f"  CNN       {encoder.get('encoder', 'efficientnet_lite0')}"
                 + (", fine-tuned (carried in the file)" if checkpoint.encoder_state else "")
                 + (f", weights {encoder['weights_hash']}" if encoder.get("weights_hash") else "")
                 + (f"; photos {RESIZED.get(preprocessing.get('resize'), 'resized')} to {size}x{size}" if size else "")
                 + f"; {config.feature_dim}-dim features")
    stage, seen = info, 0
    while stage and seen < 5:  # each stage, then the one it started from
        lines.append(("  trained   " if not seen else "  before    ") + training_stage(stage))
        stage, seen = earlier_stage(stage), seen + 1
    val = info.get("val_metrics") or {}
    if val:
        decode = info.get("val_decode") or {}
        how = ", ".join(filter(None, [
            f"{decode.get('strategy', 'beam')} {decode.get('beam_size', '')}".strip(),
            f"length penalty {decode['length_penalty']}" if "length_penalty" in decode else "",
            "epoch " + str(info["epoch"]) if "epoch" in info else ""]))
        lines.append("  val       " + "  ".join(f"{name} {value * 100:.1f}" for name, value in val.items()
                                                if isinstance(value, (int, float))) + (f"  ({how})" if how else ""))
    defaults = DecodeConfig()
    lines.append(f"  decoding  beam {defaults.beam_size}, length penalty {defaults.length_penalty}, at most "
                 f"{defaults.max_length} tokens, concepts of p >= {defaults.concept_threshold} (at most "
                 f"{defaults.max_constraints} per photo): what `captioner caption` does unless told otherwise")
    lines.append("  (everything it records: captioner info CHECKPOINT --json)")
    return "\n".join(lines)
