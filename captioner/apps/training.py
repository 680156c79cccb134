"""`captioner train`: one command for every way of training, as settings of one run.

Where the run starts is `--init-from` (a trained checkpoint; none: a new decoder) and what it optimises is
`--objective`: `xe` (cross-entropy on cached features, the default), `scst` (self-critical CIDEr-D rewards
on cached features) or `finetune` (the CNN and the decoder together, on the images). The flags become the
library's settings dataclasses once (`TrainConfig`, `ScstConfig`, `FinetuneConfig`, `ModelConfig`), and a
flag the chosen objective would not use is refused with the reason, never silently dropped.

Older spellings still work, each with a one-line notice on stderr: `captioner train --scst` (now
`--objective scst`) and `captioner finetune CKPT` (now `captioner train --objective finetune --init-from
CKPT`).
"""

from __future__ import annotations

import argparse
from typing import Any

from captioner.apps.commands import deprecated, load_data
from captioner.config import DecodeConfig, FinetuneConfig, ModelConfig, ScstConfig, TrainConfig

OBJECTIVES = ("xe", "scst", "finetune")
NAMES = {"xe": "cross-entropy training", "scst": "SCST", "finetune": "CNN fine-tuning"}
# What to do when the data has no train split (train has no --split: the data's files assign the splits).
TRAIN_SPLIT_ADVICE = ("captioner train reads the train split and scores the val split: give data that assigns them "
                      "(a Karpathy dataset_*.json, Flickr8k with its image lists, COCO files named by split such as "
                      "captions_train2014.json, or COCO files with --karpathy-split FILE)")
SHAPE_FLAGS = {"embed_dim": "embed_dim", "hidden_dim": "hidden_dim", "image_dim": "image_dim", "layers": "num_layers",
               "dropout": "dropout", "image_input": "image_input"}  # flag -> ModelConfig field
# Flags that are not settings of the run (the data's, the command's own).
NOT_SETTINGS = {"command", "func", "objective", "scst", "data", "layout", "images", "karpathy_split", "skip_invalid"}
SHARED = {"out", "resume", "overwrite", "init_from", "epochs", "seed", "patience", "val_images", "val_beam_size"}
USES = {  # the flags each objective uses, besides SHARED
    "xe": {"features", "lr", "label_smoothing", "batch_size", "min_word_count", "ema_decay", *SHAPE_FLAGS, "device",
           "amp", "text_corpus", "pseudo_target_p"},
    "scst": {"features", "lr", "scst_samples", "scst_batch_images", "scst_baseline", "scst_candidates",
             "scst_dropout", "device"},
    "finetune": {"label_smoothing", "batch_images", "encoder_lr", "decoder_lr", "warmup_steps", "no_flip",
                 "train_images", "threads", "device"},
}
WHY_NOT = {  # (objective, flag) -> why the objective does not use it, where a word helps
    ("scst", "amp"): "SCST runs in float32", ("finetune", "amp"): "CNN fine-tuning runs in float32",
    ("scst", "batch_size"): "SCST batches images: use --scst-batch-images",
    ("finetune", "batch_size"): "CNN fine-tuning batches images: use --batch-images",
    ("finetune", "features"): "CNN fine-tuning runs the CNN on the images, it reads no feature cache",
    ("finetune", "lr"): "CNN fine-tuning has two rates: use --encoder-lr and --decoder-lr",
    ("scst", "label_smoothing"): "SCST has no cross-entropy to smooth",
    ("scst", "ema_decay"): "the weight average is kept for cross-entropy training",
    ("finetune", "ema_decay"): "the weight average is kept for cross-entropy training",
    ("scst", "text_corpus"): "captions without photos are cross-entropy training data",
    ("finetune", "text_corpus"): "captions without photos are cross-entropy training data",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def objective_of(flags: dict[str, Any]) -> str:
    """The objective the flags ask for; `--scst` is the old spelling of `--objective scst`."""
    objective = flags.get("objective")
    if flags.get("scst"):
        deprecated("train", "--scst", "--objective scst")
        if objective not in (None, "scst"):
            raise ValueError(f"--scst means --objective scst; it does not go with --objective {objective}")
        objective = "scst"
    return objective or "xe"


def check_flags(objective: str, flags: dict[str, Any]) -> None:
    """Refuse a flag the objective would not use, and a run without what it needs."""
    for name, value in flags.items():
        if name in NOT_SETTINGS or value is None or value is False:
            continue
        if name in SHAPE_FLAGS and (objective != "xe" or flags.get("init_from")):
            why = "the decoder keeps the shape of its --init-from checkpoint"
        elif name == "device" and objective != "xe" and value != "cpu":
            why = f"{NAMES[objective]} runs on the CPU"
        elif name in SHARED or name in USES[objective]:
            continue
        else:
            users = [f"--objective {other}" for other in OBJECTIVES if name in USES[other]]
            why = WHY_NOT.get((objective, name), f"it is a setting of {' and '.join(users)}")
        raise ValueError(f"{flag(name)}: {NAMES[objective]} (--objective {objective}) does not use it ({why}); "
                         "leave it out")
    if objective != "xe" and not flags.get("init_from"):
        raise ValueError(f"--objective {objective} trains a trained model further: give its checkpoint with "
                         "--init-from")
    if objective != "finetune" and not flags.get("features"):
        raise ValueError(f"--objective {objective} trains on cached features: give the cache made by "
                         "`captioner features` with --features")


def validation(flags: dict[str, Any]) -> DecodeConfig | None:
    """Validation's decoding: beam search of --val-beam-size (None: the settings' default)."""
    size = flags.get("val_beam_size")
    return None if size is None else DecodeConfig(strategy="beam", beam_size=size, concept_threshold=None)


def settings(objective: str, flags: dict[str, Any]) -> TrainConfig | ScstConfig | FinetuneConfig:
    """The objective's settings from the flags (an unset flag: the dataclass default)."""
    shared = dict(epochs=flags.get("epochs"), seed=flags.get("seed"), patience=flags.get("patience"),
                  val_max_images=flags.get("val_images"), val_decode=validation(flags))
    if objective == "scst":
        return ScstConfig.from_options(**shared, lr=flags.get("lr"), samples_per_image=flags.get("scst_samples"),
                                       batch_images=flags.get("scst_batch_images"),
                                       baseline=flags.get("scst_baseline"), candidates=flags.get("scst_candidates"),
                                       dropout=flags.get("scst_dropout"))
    if objective == "finetune":
        return FinetuneConfig.from_options(**shared, batch_images=flags.get("batch_images"),
                                           encoder_lr=flags.get("encoder_lr"), decoder_lr=flags.get("decoder_lr"),
                                           warmup_steps=flags.get("warmup_steps"),
                                           label_smoothing=flags.get("label_smoothing"),
                                           flip=False if flags.get("no_flip") else None,
                                           train_max_images=flags.get("train_images"))
    return TrainConfig.from_options(**shared, batch_size=flags.get("batch_size"), lr=flags.get("lr"),
                                    label_smoothing=flags.get("label_smoothing"),
                                    min_word_count=flags.get("min_word_count"), ema_decay=flags.get("ema_decay"))


def decoder_shape(flags: dict[str, Any]) -> ModelConfig | None:
    """The new decoder's shape from the shape flags (None when none is given: the defaults)."""
    given = {field: flags[name] for name, field in SHAPE_FLAGS.items() if flags.get(name) is not None}
    try:
        return ModelConfig(**given) if given else None
    except ValueError as error:  # "num_layers must be ..." -> "--layers 0: must be ..."
        field, _, problem = str(error).partition(" ")
        name = next((name for name, known in SHAPE_FLAGS.items() if known == field), field)
        raise ValueError(f"{flag(name)} {flags.get(name)}: {problem}") from None


def run_training(flags: dict[str, Any]) -> int:
    """`captioner train` with its parsed flags (`vars(args)`)."""
    from captioner import distributed
    from captioner.train.state import check_run_folder
    from captioner.utils import resolve_device

    objective = objective_of(flags)
    check_flags(objective, flags)
    config = settings(objective, flags)
    decoder_shape(flags)  # a bad shape flag, before anything is read
    check_run_folder(flags["out"], bool(flags.get("resume")), bool(flags.get("overwrite")))  # before the data
    device = resolve_device(flags.get("device") or ("auto" if objective == "xe" else "cpu"))
    with distributed.session(device):  # under torchrun: data-parallel (NCCL on CUDA, gloo on the CPU)
        best = _run(objective, flags, config, device)
    distributed.print0(f"best checkpoint: {best}")
    return 0


def _run(objective: str, flags: dict[str, Any], config: Any, device: Any) -> Any:
    from captioner.train import autocast_dtype, cached_splits, finetune, train_on_cache, train_scst

    if objective == "xe":
        autocast_dtype(flags.get("amp"), device)  # refuse a bad --amp before reading any data
    from captioner.checkpoint import portable_path

    dataset = load_data(argparse.Namespace(**flags))
    train_records = dataset.require_split("train", advice=TRAIN_SPLIT_ADVICE)
    dataset.require_split("val", advice=TRAIN_SPLIT_ADVICE)
    init_from, out = flags.get("init_from"), flags["out"]
    run = dict(resume=bool(flags.get("resume")), overwrite=bool(flags.get("overwrite")),
               data_name=portable_path(flags["data"]), device=device)
    if objective == "finetune":
        if flags.get("threads"):
            import torch

            torch.set_num_threads(flags["threads"])
        return finetune(init_from, train_records, dataset.split("val"), out, config, **run)
    if objective == "scst":
        splits = cached_splits(dataset, flags["features"])
        features_encoder = splits.pop("encoder")
        return train_scst(**splits, out_dir=out, init_checkpoint=init_from, config=config,
                          features_encoder=features_encoder, **run)
    pseudo_target_p = flags.get("pseudo_target_p")
    return train_on_cache(dataset, flags["features"], out, decoder_shape(flags), config, amp=flags.get("amp"),
                          init_checkpoint=init_from, text_corpus=flags.get("text_corpus"), **run,
                          **({} if pseudo_target_p is None else {"pseudo_target_p": pseudo_target_p}))


def cmd_train(args: argparse.Namespace) -> int:
    return run_training(vars(args))


def cmd_finetune(args: argparse.Namespace) -> int:
    """The old spelling: `captioner finetune CKPT ...` is `captioner train --objective finetune --init-from CKPT`."""
    deprecated("finetune", "`captioner finetune CKPT`", "`captioner train --objective finetune --init-from CKPT`")
    flags = {name: value for name, value in vars(args).items() if name != "checkpoint"}
    return run_training({**flags, "objective": "finetune", "init_from": args.checkpoint})
