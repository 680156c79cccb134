"""Settings as dataclasses: the one source of defaults for the model, decoding, re-ranking and training."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

# Constraints per image in constrained beam search: its states are the subsets of the constraints, so each
# more doubles the beams (captioner.decoding.beam).
MAX_CONSTRAINTS = 2

class Options:
    """Base of the settings a door builds: from optional values, where None means the default (so a door
    passes its flags through without copying any default by hand)."""

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        return cls(**{name: value for name, value in options.items() if value is not None})

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> Any:
        """`from_options` with the entries of `flags` (a command line's parsed flags, `vars(args)`) that
        name one of this class's fields; the others belong to other settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_options(**{name: value for name, value in flags.items() if name in names})


@dataclass
class ModelConfig:
    """Decoder shape. `vocab_size` comes from the vocabulary and `feature_dim` (the CNN feature size) from the
    features: training sets both when it builds a new decoder, so a shape to train is e.g.
    `ModelConfig(hidden_dim=256)`."""

    vocab_size: int = 0
    feature_dim: int = 1280
    embed_dim: int = 512
    hidden_dim: int = 512
    image_dim: int = 512  # size of the projected image feature that feeds the gates
    num_layers: int = 1
    dropout: float = 0.5
    # "every": W_ih·v enters the gates at every step (par-inject); "first": v is only the first input.
    image_input: Literal["every", "first"] = "every"

    def __post_init__(self) -> None:
        for name in ("feature_dim", "embed_dim", "hidden_dim", "image_dim", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            raise ValueError(f"vocab_size must be a whole number (0: set from the vocabulary), got {self.vocab_size!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a rate in [0, 1), got {self.dropout!r}")
        if self.image_input not in ("every", "first"):
            raise ValueError(f"image_input must be 'every' or 'first', got {self.image_input!r}")


@dataclass
class DecodeConfig(Options):
    """How captions are generated. One object for every door (CLI, demo, evaluation, training)."""

    strategy: Literal["greedy", "sample", "beam"] = "beam"
    beam_size: int = 3
    n_best: int = 1
    max_length: int = 20  # generated tokens, <end> included
    # beam score = log_prob / length**length_penalty (0: plain sum). 0.5 was chosen on Flickr8k val: +0.9
    # CIDEr-D with beam 3 (docs/experiments.md). With 0, beam_size=1 gives exactly the greedy caption.
    length_penalty: float = 0.5
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    no_repeat_ngram_size: int = 0  # 0: allow repeats
    seed: int | None = None
    # Concepts from the CNN's ImageNet classifier (captioner.concepts) with p >= this threshold, at most
    # `max_constraints` of them that the vocabulary can say, are reported with each caption; beam search is
    # made to mention them (constrained beam search). None: concepts off, plain decoding. Used only where the
    # door passes the ImageNet logits (`decode_features(concept_logits=)`). 0.3 was chosen on coco-dev and
    # Flickr8k val together: the best sum of their CIDEr-D among 0.2/0.3/0.4 for the shipped model
    # (docs/experiments.md, 2026-12-01).
    concept_threshold: float | None = 0.3
    max_constraints: int = MAX_CONSTRAINTS

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; use greedy, sample or beam")
        if self.beam_size < 1 or self.n_best < 1 or self.max_length < 1:
            raise ValueError("beam_size, n_best and max_length must be at least 1")
        if self.strategy == "beam" and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed beam_size ({self.beam_size})")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be >= 0")
        threshold = self.concept_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"concept_threshold must be a probability in [0, 1], or None (concepts off); "
                             f"got {threshold!r}")
        if (isinstance(self.max_constraints, bool) or not isinstance(self.max_constraints, int)
                or not 0 <= self.max_constraints <= MAX_CONSTRAINTS):
            raise ValueError(f"max_constraints must be an integer from 0 to {MAX_CONSTRAINTS}, "
                             f"got {self.max_constraints!r}")


@dataclass(frozen=True)
class RerankConfig:
    """How consensus re-ranking chooses (defaults chosen on Flickr8k val, docs/experiments.md)."""

    neighbours: int = 20  # nearest training images whose captions vote
    candidates: int = 20  # beam size and n-best list re-ranked
    model_weight: float = 0.0  # + this times the candidate's beam score

    def __post_init__(self) -> None:
        if self.neighbours < 1 or self.candidates < 1:
            raise ValueError(f"RerankConfig: neighbours and candidates must be at least 1, got {self.neighbours} "
                             f"and {self.candidates}")
        if self.model_weight < 0:
            raise ValueError(f"RerankConfig.model_weight must be >= 0, got {self.model_weight}")

    def decode_config(self, config: DecodeConfig) -> DecodeConfig:
        """The beam search that writes the candidates (the other settings, e.g. length penalty, kept)."""
        if config.strategy != "beam":
            raise ValueError(f"consensus re-ranking re-ranks beam-search candidates; got strategy {config.strategy!r}")
        if config.n_best > self.candidates:
            raise ValueError(f"n_best ({config.n_best}) cannot exceed the re-ranked candidates ({self.candidates})")
        return replace(config, beam_size=self.candidates, n_best=self.candidates)

    @classmethod
    def from_command(cls, options: Mapping[str, Any]) -> RerankConfig | None:
        """The re-ranking settings of a command line (`memory`, `rerank_neighbours`, `rerank_candidates`,
        `rerank_weight`, and `strategy` when it has one), or None without a memory. Re-ranking re-orders
        beam-search candidates, so a memory with another strategy is refused."""
        if options.get("memory") is None:
            return None
        strategy = options.get("strategy", "beam")  # the demo has no --strategy: it chooses per request
        if strategy != "beam":
            raise ValueError(f"--memory re-ranks beam-search candidates; it does not go with --strategy {strategy}")
        defaults = cls()
        return cls(neighbours=options.get("rerank_neighbours", defaults.neighbours),
                   candidates=options.get("rerank_candidates", defaults.candidates),
                   model_weight=options.get("rerank_weight", defaults.model_weight))


def validation_decode(config: DecodeConfig) -> DecodeConfig:
    """`config` as validation runs it: validation decodes the val features without the CNN's ImageNet
    classifier, so without concepts (concept_threshold None). The training settings hold it this way, so a
    checkpoint records the decoding its val scores came from (runs saved before recorded 0.3, which never
    ran; they read back as None, so they still resume)."""
    return config if config.concept_threshold is None else replace(config, concept_threshold=None)


def _validation_default() -> DecodeConfig:
    return DecodeConfig(strategy="beam", beam_size=3, concept_threshold=None)


@dataclass
class TrainConfig(Options):
    """Optimisation settings for teacher-forced training on cached features."""

    epochs: int = 16
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 5.0
    label_smoothing: float = 0.1  # chosen on val: +1.1 CIDEr-D over 0.0 (docs/experiments.md)
    min_word_count: int = 5
    max_caption_length: int = 30  # longer training captions are truncated (<end> kept)
    patience: int = 4  # epochs without val CIDEr-D improvement before stopping
    # > 0: keep an exponential moving average of the weights (decay per update), validate and save it
    # instead of the raw weights; the raw weights are scored too, for comparison (`val_raw` in the log).
    ema_decay: float = 0.0
    seed: int = 0
    val_decode: DecodeConfig = field(default_factory=_validation_default)  # see `validation_decode`
    val_max_images: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        self.val_decode = validation_decode(self.val_decode)


@dataclass
class ScstConfig(Options):
    """Settings of self-critical fine-tuning (`captioner train --objective scst`, captioner.train.scst)."""

    epochs: int = 10
    batch_images: int = 50  # images per update; each contributes samples_per_image captions
    samples_per_image: int = 5
    lr: float = 5e-5  # constant: a small step away from the XE optimum, which CIDEr-D rewards can wreck
    weight_decay: float = 0.0  # no pull towards zero while fine-tuning
    max_length: int = 16  # sampled tokens, <end> included
    grad_clip: float = 5.0  # max global gradient norm
    baseline: Literal["mean", "greedy"] = "mean"
    candidates: Literal["sample", "beam"] = "sample"  # beam: the K best beams (length penalty of val_decode)
    dropout: float | None = None  # None: keep the XE model's dropout while sampling; else use this rate
    patience: int = 3  # epochs without val CIDEr-D improvement before stopping
    seed: int = 0
    val_decode: DecodeConfig = field(default_factory=_validation_default)  # see `validation_decode`
    val_max_images: int | None = None

    def __post_init__(self) -> None:
        self.val_decode = validation_decode(self.val_decode)
        if self.baseline not in ("mean", "greedy"):
            raise ValueError(f"ScstConfig.baseline must be 'mean' or 'greedy', got {self.baseline!r}")
        if self.candidates not in ("sample", "beam"):
            raise ValueError(f"ScstConfig.candidates must be 'sample' or 'beam', got {self.candidates!r}")
        if self.candidates == "beam" and self.baseline != "mean":
            raise ValueError("beam candidates are compared with each other: use the mean baseline")
        if self.baseline == "mean" and self.samples_per_image < 2:
            raise ValueError("the mean baseline averages the other samples of an image: samples_per_image "
                             f"must be at least 2, got {self.samples_per_image}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"ScstConfig.dropout must be in [0, 1) or None, got {self.dropout}")
        if self.samples_per_image < 1 or self.batch_images < 1 or self.max_length < 1 or self.epochs < 0:
            raise ValueError("samples_per_image, batch_images and max_length must be at least 1, epochs >= 0")


@dataclass
class FinetuneConfig(Options):
    """Settings of CNN fine-tuning (`captioner train --objective finetune`, captioner.train.finetuning): the CNN
    trained together with the decoder."""

    epochs: int = 2
    batch_images: int = 16  # images per step, each with all its captions
    encoder_lr: float = 1e-4
    decoder_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    flip: bool = True
    max_caption_length: int = 30
    patience: int = 3  # epochs without val CIDEr-D improvement (over the start too) before stopping
    seed: int = 0
    val_decode: DecodeConfig = field(default_factory=_validation_default)  # see `validation_decode`
    val_max_images: int | None = None
    train_max_images: int | None = None  # smoke runs only

    def __post_init__(self) -> None:
        self.val_decode = validation_decode(self.val_decode)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict) -> Any:
    """Build a config dataclass from plain JSON data, checking names and basic types."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    kwargs = {}
    for name, value in data.items():
        kind = known[name].type
        if name == "val_decode" and isinstance(value, dict):
            value = from_dict(DecodeConfig, value)
        elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{cls.__name__}.{name}: expected an integer, got {value!r}")
        elif kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{cls.__name__}.{name}: expected a number, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)

