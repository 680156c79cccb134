"""`captioner <command>`: argument parsing only; every command calls into the library.

Exit status: 0 success; 1 the job ran but some inputs failed (e.g. unreadable images); 2 bad usage
or unusable inputs (a missing checkpoint, a broken data file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.config import DecodeConfig, FinetuneConfig, ModelConfig, ScstConfig, TrainConfig

DEFAULT_CHECKPOINT = "checkpoints/flickr8k-lite0"


def default_checkpoint() -> Path:
    """The checkpoint a command uses without --checkpoint (captioner.checkpoint.default_checkpoint_path)."""
    from captioner.checkpoint import default_checkpoint_path

    return default_checkpoint_path()


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


def add_rerank_arguments(parser: argparse.ArgumentParser, memory_help: str) -> None:
    from captioner.rerank import RerankConfig

    group = parser.add_argument_group("consensus re-ranking (with a caption memory of training images)")
    defaults = RerankConfig()
    group.add_argument("--memory", default=None, help=memory_help)
    group.add_argument("--rerank-neighbours", type=int, default=defaults.neighbours,
                       help="nearest memory images whose captions vote")
    group.add_argument("--rerank-candidates", type=int, default=defaults.candidates,
                       help="beam size: the candidates re-ranked")
    group.add_argument("--rerank-weight", type=float, default=defaults.model_weight,
                       help="weight of the beam score beside the consensus")


def rerank_config(args: argparse.Namespace):
    """The re-ranking settings, or None without --memory (refused with other strategies than beam)."""
    from captioner.rerank import RerankConfig

    if args.memory is None:
        return None
    if getattr(args, "strategy", "beam") != "beam":  # the demo has no --strategy: it chooses per request
        raise ValueError(f"--memory re-ranks beam-search candidates; it does not go with --strategy {args.strategy}")
    return RerankConfig(neighbours=args.rerank_neighbours, candidates=args.rerank_candidates,
                        model_weight=args.rerank_weight)


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    return DecodeConfig(strategy=args.strategy, beam_size=args.beam_size, n_best=args.n_best,
                        max_length=args.max_length, length_penalty=args.length_penalty,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    from captioner.images import DEFAULT_MAX_PIXELS, JPEG_HEADER_FACTOR, PROGRESSIVE_JPEG_HEADER_FACTOR

    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"the most pixels decoded per image (default {DEFAULT_MAX_PIXELS:,}: about "
             f"{3 * DEFAULT_MAX_PIXELS / 1e6:,.0f} MB as RGB, a few times that while converting). Larger JPEGs "
             f"are decoded at 1/2, 1/4 or 1/8 scale to fit (up to {JPEG_HEADER_FACTOR}× N pixels in the header, "
             f"{PROGRESSIVE_JPEG_HEADER_FACTOR}× N for progressive JPEGs, whose decoder holds 3-6 bytes per "
             "header pixel); other formats larger than N are refused as possible decompression bombs")


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


def load_data(args: argparse.Namespace):
    from captioner import distributed
    from captioner.data import load_dataset

    dataset = load_dataset(args.data, layout=args.layout, images_dir=args.images,
                           skip_invalid=args.skip_invalid, karpathy_split=args.karpathy_split)
    if dataset.report and distributed.is_main():  # once per torchrun group
        print(dataset.report.summary(), file=sys.stderr)
    return dataset


# ------------------------------------------------------------------------------------------ commands
def cmd_features(args: argparse.Namespace) -> int:
    from captioner import distributed
    from captioner.features import extract_features
    from captioner.utils import resolve_device

    device = resolve_device(args.device)
    with distributed.session(device, backend="gloo"):  # under torchrun: one shard of the images per rank
        dataset = load_data(args)
        splits = args.splits.split(",")
        records = [r for r in dataset.records if r.split in splits]
        encoder = _features_encoder(args)
        cache = extract_features(records, encoder, args.out, batch_size=args.batch_size,
                                 num_workers=args.workers, device=device, max_pixels=args.max_pixels)
        distributed.print0(f"{len(cache)} image features in {args.out}")
    return 1 if cache.meta.get("failed") else 0


def _features_encoder(args: argparse.Namespace):
    """The CNN `captioner features` runs: --encoder/--encoder-weights, or the one a checkpoint was trained with
    (its own fine-tuned weights when it carries them), checked against the checkpoint's weights hash."""
    from captioner.encoder import DEFAULT_ENCODER, checkpoint_encoder, get_encoder

    if not args.from_checkpoint:
        return get_encoder(args.encoder or DEFAULT_ENCODER, weights=args.encoder_weights,
                           allow_random=args.allow_random_weights)
    if args.encoder or args.encoder_weights or args.allow_random_weights:
        raise ValueError("--from-checkpoint takes the CNN from the checkpoint; leave out --encoder, "
                         "--encoder-weights and --allow-random-weights")
    from captioner.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.from_checkpoint)
    return checkpoint_encoder(checkpoint.encoder, str(checkpoint.path), checkpoint.encoder_state)


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
        return _train_scst(args)
    if args.init_from:
        raise ValueError("--init-from goes with --scst (fine-tuning a trained checkpoint)")
    dataset = load_data(args)
    config = TrainConfig.from_options(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                      label_smoothing=args.label_smoothing, min_word_count=args.min_word_count,
                                      patience=args.patience, val_max_images=args.val_images,
                                      ema_decay=args.ema_decay,
                                      val_decode=DecodeConfig(strategy="beam", beam_size=args.val_beam_size))
    model_config = {"embed_dim": args.embed_dim, "hidden_dim": args.hidden_dim, "image_dim": args.image_dim,
                    "num_layers": args.layers, "dropout": args.dropout, "image_input": args.image_input}
    best = train_on_cache(dataset, args.features, args.out, model_config, config, resume=args.resume,
                          device=device, amp=args.amp)
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

    from captioner.evaluation import evaluate_checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("evaluate runs in one process; start it without torchrun")
    rerank = rerank_config(args)
    dataset = load_data(args)
    checkpoints = args.checkpoint or [default_checkpoint()]
    report = evaluate_checkpoint(checkpoints, dataset, args.split, decode_config(args), out_dir=args.out,
                                 features_dir=args.features, batch_size=args.batch_size, device=args.device,
                                 coco_eval=args.coco_eval, html=not args.no_html, memory=args.memory,
                                 rerank=rerank, max_pixels=args.max_pixels)
    return 1 if report["skipped_images"] else 0


def cmd_caption(args: argparse.Namespace) -> int:
    from captioner import distributed
    from captioner.batch import caption_paths
    from captioner.utils import resolve_device

    rerank = rerank_config(args)
    with distributed.session(resolve_device(args.device), backend="gloo"):
        if distributed.is_distributed():  # under torchrun: one shard per rank, merged by rank 0
            if rerank is not None:
                raise ValueError("--memory runs in one process; start it without torchrun")
            return distributed.caption_paths_sharded(
                args.paths, checkpoint=args.checkpoint or default_checkpoint(), config=decode_config(args),
                output=args.output, recursive=args.recursive, resume=args.resume, batch_size=args.batch_size,
                num_workers=args.workers, device=args.device, decode_batch_size=args.decode_batch_size,
                max_pixels=args.max_pixels)
    checkpoint = args.checkpoint or default_checkpoint()
    if rerank is not None:
        from captioner.api import Captioner

        checkpoint = Captioner.from_pretrained(checkpoint, device=args.device, memory=args.memory, rerank=rerank)
    return caption_paths(args.paths, checkpoint=checkpoint,
                         config=decode_config(args), output=args.output, recursive=args.recursive,
                         resume=args.resume, batch_size=args.batch_size, num_workers=args.workers,
                         device=args.device, decode_batch_size=args.decode_batch_size,
                         max_pixels=args.max_pixels)


def cmd_demo(args: argparse.Namespace) -> int:
    from captioner.demo import launch

    launch(args.checkpoint or default_checkpoint(), host=args.host, port=args.port, share=args.share,
           memory=args.memory, rerank=rerank_config(args), max_pixels=args.max_pixels)
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from captioner.checkpoint import load_checkpoint
    from captioner.evaluation import build_memory
    from captioner.utils import resolve_device

    dataset = load_data(args)
    checkpoint = load_checkpoint(args.checkpoint or default_checkpoint())
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
    best = finetune(args.checkpoint, dataset.split("train"), dataset.split("val"), args.out, config,
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


def build_parser() -> argparse.ArgumentParser:
    from captioner import __version__

    parser = argparse.ArgumentParser(prog="captioner", description="Caption images with a CNN + LSTM model.")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("caption", help="caption image files, folders and globs")
    p.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", default=None, help=f"default: the shipped {DEFAULT_CHECKPOINT}")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--output", "-o", default=None, help="results file: .jsonl, .csv or .json (default: print)")
    p.add_argument("--resume", action="store_true", help="skip images already in --output")
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
    p.set_defaults(func=cmd_caption)

    p = commands.add_parser("evaluate", help="score a checkpoint on a dataset split (BLEU, CIDEr-D, ROUGE-L)")
    p.add_argument("--checkpoint", default=None, nargs="+",
                   help="a checkpoint; several are decoded jointly as an ensemble (one shared vocabulary); "
                        f"default: the shipped {DEFAULT_CHECKPOINT}")
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
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("memory", help="build a caption memory (training images' features and captions) "
                                           "for consensus re-ranking")
    add_data_arguments(p)
    p.add_argument("--checkpoint", default=None, help=f"whose CNN makes the features (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--split", default="train", help="the images to remember (never the split you evaluate on)")
    p.add_argument("--features", default=None, nargs="+", help="feature cache(s) of that CNN, instead of running it")
    p.add_argument("--out", required=True, help="the memory file (.safetensors); it holds the dataset's captions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_memory)

    p = commands.add_parser("features", help="compute and cache CNN features for a dataset")
    add_data_arguments(p)
    p.add_argument("--encoder", default=None, help="default: efficientnet_lite0")
    p.add_argument("--encoder-weights", default=None, help="a local weights file for the encoder")
    p.add_argument("--from-checkpoint", default=None, metavar="CKPT",
                   help="use the CNN this checkpoint was trained with (its own, if fine-tuned) instead of --encoder")
    p.add_argument("--allow-random-weights", action="store_true", help="testing only: untrained CNN")
    p.add_argument("--out", required=True, help="cache folder (resumed if it exists)")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="image loading processes (default: chosen for the device)")
    p.add_argument("--device", default="auto")
    add_image_arguments(p)
    p.set_defaults(func=cmd_features)

    p = commands.add_parser("train", help="train a decoder on cached features")
    add_data_arguments(p)
    defaults, model_defaults, scst_defaults = TrainConfig(), ModelConfig(vocab_size=0), ScstConfig()
    p.add_argument("--features", required=True, help="feature cache made by `captioner features`")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: {defaults.epochs} (cross-entropy), {scst_defaults.epochs} (--scst)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="captions per update over all processes (under torchrun each takes its share)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"default: {defaults.lr} (cross-entropy), {scst_defaults.lr} (--scst)")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    p.add_argument("--min-word-count", type=int, default=defaults.min_word_count)
    p.add_argument("--patience", type=int, default=defaults.patience)
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                   help="> 0: validate and keep an exponential moving average of the weights with this decay "
                        "per update (e.g. 0.999); the raw weights are scored too, as val_raw in log.jsonl")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--val-images", type=int, default=None, help="score only the first N val images")
    p.add_argument("--val-beam-size", type=int, default=defaults.val_decode.beam_size)
    p.add_argument("--embed-dim", type=int, default=model_defaults.embed_dim)
    p.add_argument("--hidden-dim", type=int, default=model_defaults.hidden_dim)
    p.add_argument("--image-dim", type=int, default=model_defaults.image_dim)
    p.add_argument("--layers", type=int, default=model_defaults.num_layers)
    p.add_argument("--dropout", type=float, default=model_defaults.dropout)
    p.add_argument("--image-input", choices=["every", "first"], default=model_defaults.image_input)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="mixed precision: bf16 or fp16 (with loss scaling) on CUDA; bf16 also runs on the CPU")
    scst = p.add_argument_group("self-critical fine-tuning (SCST, reward = CIDEr-D)")
    scst.add_argument("--scst", action="store_true", help="fine-tune --init-from with SCST instead of XE training")
    scst.add_argument("--init-from", default=None, help="the cross-entropy checkpoint to fine-tune")
    scst.add_argument("--scst-samples", type=int, default=scst_defaults.samples_per_image,
                      help="sampled captions per image")
    scst.add_argument("--scst-batch-images", type=int, default=scst_defaults.batch_images, help="images per update")
    scst.add_argument("--scst-baseline", choices=["mean", "greedy"], default=scst_defaults.baseline,
                      help="mean reward of the other samples, or the greedy caption's reward")
    scst.add_argument("--scst-candidates", choices=["sample", "beam"], default=scst_defaults.candidates,
                      help="the captions rewarded: sampled, or each image's best beams (beam size "
                           "--scst-samples, mean baseline)")
    scst.add_argument("--scst-dropout", type=float, default=None,
                      help="dropout rate while sampling (default: the XE model's own)")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("finetune", help="fine-tune the CNN together with a trained decoder, on images")
    p.add_argument("checkpoint", help="the trained checkpoint to start from")
    add_data_arguments(p)
    f_defaults = FinetuneConfig()
    p.add_argument("--out", required=True, help="run folder (best/last checkpoints, log, curves)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--epochs", type=int, default=f_defaults.epochs)
    p.add_argument("--batch-images", type=int, default=f_defaults.batch_images,
                   help="images per step, each with all its captions")
    p.add_argument("--encoder-lr", type=float, default=f_defaults.encoder_lr)
    p.add_argument("--decoder-lr", type=float, default=f_defaults.decoder_lr)
    p.add_argument("--warmup-steps", type=int, default=f_defaults.warmup_steps)
    p.add_argument("--label-smoothing", type=float, default=f_defaults.label_smoothing)
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips of training images")
    p.add_argument("--patience", type=int, default=f_defaults.patience,
                   help="epochs without val CIDEr-D gain (over the start too) before stopping")
    p.add_argument("--seed", type=int, default=f_defaults.seed)
    p.add_argument("--val-images", type=int, default=None, help="score only the first N val images")
    p.add_argument("--train-images", type=int, default=None, help="train on the first N images (smoke runs)")
    p.add_argument("--val-beam-size", type=int, default=f_defaults.val_decode.beam_size)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_finetune)

    p = commands.add_parser("demo", help="start the Gradio web demo")
    p.add_argument("--checkpoint", default=None, help=f"default: the shipped {DEFAULT_CHECKPOINT}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    add_image_arguments(p)
    add_rerank_arguments(p, "a caption memory (`captioner memory`): beam search re-ranks its candidates by consensus")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("info", help="print a checkpoint's settings and scores")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
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
