"""What each `captioner` command does with its parsed flags: turn them into the library's settings and call
the library. Heavy modules (torch and what needs it) are imported inside the commands, so that
`captioner --help` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from captioner.config import (
    DecodeConfig,
    FinetuneConfig,
    ModelConfig,
    RerankConfig,
    ScstConfig,
    TrainConfig,
    to_dict,
)


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

    device = resolve_device(args.device)
    with distributed.session(device, backend="gloo"):  # under torchrun: one shard of the images per rank
        dataset = load_data(args)
        splits = args.splits.split(",")
        records = [r for r in dataset.records if r.split in splits]
        encoder = feature_run_encoder(args.encoder, args.encoder_weights, args.allow_random_weights,
                                      args.from_checkpoint)
        cache = extract_features(records, encoder, args.out, batch_size=args.batch_size,
                                 num_workers=args.workers, device=device, max_pixels=args.max_pixels)
        distributed.print0(f"{len(cache)} image features in {args.out}")
    return 1 if cache.meta.get("failed") else 0


def cmd_train(args: argparse.Namespace) -> int:
    from captioner import distributed
    from captioner.utils import resolve_device

    device = resolve_device(args.device)
    with distributed.session(device):  # under torchrun: data-parallel (NCCL on CUDA, gloo on the CPU)
        return _train(args, device)


def _train(args: argparse.Namespace, device) -> int:
    from captioner import distributed
    from captioner.train import autocast_dtype, train_on_cache

    autocast_dtype(args.amp, device)  # refuse a bad --amp before reading any data
    if args.scst:
        if args.text_corpus:
            raise ValueError("--text-corpus adds cross-entropy training data; --scst does not use it")
        return _train_scst(args)
    dataset = load_data(args)
    dataset.require_split("train")
    config = TrainConfig.from_options(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                      label_smoothing=args.label_smoothing, min_word_count=args.min_word_count,
                                      patience=args.patience, val_max_images=args.val_images,
                                      ema_decay=args.ema_decay,
                                      val_decode=DecodeConfig(strategy="beam", beam_size=args.val_beam_size))
    model_config = {"embed_dim": args.embed_dim, "hidden_dim": args.hidden_dim, "image_dim": args.image_dim,
                    "num_layers": args.layers, "dropout": args.dropout, "image_input": args.image_input}
    if args.init_from:  # the initial checkpoint's shape; a shape flag set to something else is a mistake
        defaults = to_dict(ModelConfig(vocab_size=0))
        changed = sorted(k for k, v in model_config.items() if v != defaults[k])
        if changed:
            raise ValueError(f"--init-from keeps the checkpoint's decoder shape; do not set {changed}")
        model_config = None
    best = train_on_cache(dataset, args.features, args.out, model_config, config, resume=args.resume,
                          device=device, amp=args.amp, init_checkpoint=args.init_from,
                          text_corpus=args.text_corpus, pseudo_target_p=args.pseudo_target_p)
    distributed.print0(f"best checkpoint: {best}")
    return 0


def _train_scst(args: argparse.Namespace) -> int:
    from captioner.train import cached_splits, train_scst

    if not args.init_from:
        raise ValueError("--scst fine-tunes a trained model: give its checkpoint with --init-from")
    if args.ema_decay:
        raise ValueError("--ema-decay averages cross-entropy training; --scst does not use it")
    config = ScstConfig.from_options(epochs=args.epochs, lr=args.lr, samples_per_image=args.scst_samples,
                                     batch_images=args.scst_batch_images, baseline=args.scst_baseline,
                                     candidates=args.scst_candidates, dropout=args.scst_dropout,
                                     patience=args.patience, seed=args.seed, val_max_images=args.val_images,
                                     val_decode=DecodeConfig(strategy="beam", beam_size=args.val_beam_size))
    splits = cached_splits(load_data(args), args.features)
    features_encoder = splits.pop("encoder")
    best = train_scst(**splits, out_dir=args.out, init_checkpoint=args.init_from, config=config,
                      resume=args.resume, features_encoder=features_encoder)  # on the CPU, as before
    print(f"best checkpoint: {best}")
    return 0


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
    from captioner.apps.batch import (
        BatchOptions,
        ResultWriter,
        caption_paths,
        caption_paths_sharded,
        check_sharded,
    )
    from captioner.utils import resolve_device

    config, rerank = decode_config(args), rerank_config(args)
    options = BatchOptions(output=args.output, recursive=args.recursive, resume=args.resume,
                           batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
                           num_workers=args.workers)
    with distributed.session(resolve_device(args.device), backend="gloo"):
        if distributed.is_distributed():  # under torchrun: one shard per rank, merged by rank 0
            check_sharded(args.output, args.memory)
            captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, max_pixels=args.max_pixels)
            return caption_paths_sharded(args.paths, captioner, config, options)
    if args.output:  # refuse an output that would be overwritten before loading the model
        ResultWriter.check_output(args.output, args.resume)
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, memory=args.memory, rerank=rerank,
                                          max_pixels=args.max_pixels)
    return caption_paths(args.paths, captioner, config, options)


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


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from captioner.train import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig.from_options(epochs=args.epochs, batch_images=args.batch_images,
                                         encoder_lr=args.encoder_lr, decoder_lr=args.decoder_lr,
                                         warmup_steps=args.warmup_steps, label_smoothing=args.label_smoothing,
                                         flip=not args.no_flip, patience=args.patience, seed=args.seed,
                                         val_max_images=args.val_images, train_max_images=args.train_images,
                                         val_decode=DecodeConfig(strategy="beam", beam_size=args.val_beam_size))
    dataset = load_data(args)
    best = finetune(args.checkpoint, dataset.require_split("train"), dataset.split("val"), args.out, config,
                    resume=args.resume)
    print(f"best checkpoint: {best}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from captioner.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    print(json.dumps({"path": str(checkpoint.path), "config": checkpoint.model.config.__dict__,
                      "vocab_size": len(checkpoint.vocab), "encoder": checkpoint.encoder,
                      "info": checkpoint.info}, indent=2))
    return 0
