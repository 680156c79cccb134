"""What each `captioner` command does with its parsed flags: turn them into the library's settings and call
the library. Heavy modules (torch and what needs it) are imported inside the commands, so that
`captioner --help` starts fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

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
    from captioner.utils import resolve_device

    checkpoint = args.checkpoint
    if args.from_checkpoint:
        deprecated("features", "--from-checkpoint", "--checkpoint")
        if checkpoint:
            raise ValueError("--from-checkpoint is the old spelling of --checkpoint; give one of them")
        checkpoint = args.from_checkpoint
    device = resolve_device(args.device)
    with distributed.session(device, backend="gloo"):  # under torchrun: one shard of the images per rank
        dataset = load_data(args)
        splits = args.splits.split(",")
        records = [r for r in dataset.records if r.split in splits]
        encoder = feature_run_encoder(args.encoder, args.encoder_weights, args.allow_random_weights, checkpoint)
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
    dataset.require_split(args.split)  # before loading the model: a clear error for a split the data lacks
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

    dataset = load_data(args)
    dataset.require_split(args.split)
    checkpoint = load_checkpoint(args.checkpoint or default_checkpoint_path())
    memory = build_memory(dataset, args.split, checkpoint, args.features or [], args.batch_size,
                          resolve_device(args.device))
    memory.save(args.out)
    captions = sum(len(texts) for texts in memory.captions)
    print(f"caption memory of {len(memory)} {args.split} images ({captions} captions) for {checkpoint.path}: {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from captioner.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    print(json.dumps({"path": str(checkpoint.path), "config": checkpoint.model.config.__dict__,
                      "vocab_size": len(checkpoint.vocab), "encoder": checkpoint.encoder,
                      "info": checkpoint.info}, indent=2))
    return 0
