"""Score a checkpoint on a dataset split the way the papers do, and write the report files.

Every image of the split is decoded for real (batched), its caption scored against all of its
references with BLEU-1..4, CIDEr-D and ROUGE-L (captioner.metrics, which agrees with coco-caption),
with nltk's corpus_bleu beside them for comparison with tutorials (captioner.metrics.nltk_bleu),
and the out folder receives:
  report.json        scores, decoding settings, checkpoint and data fingerprints, image count, timing
  predictions.json   COCO results format [{"image_id", "caption"}], scorable by the official toolkit
  report.html        the best and worst images by per-image CIDEr-D, with captions and references

With concepts on (the default DecodeConfig), the captions use the concepts the checkpoint's CNN recognises
(its ImageNet classifier applied to the features, cached or computed), and the report and the printed
table also show the scores with concepts off. Only constrained beam search changes captions, so for that
row only the images that were constrained are decoded again; the others' captions are the same.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from captioner.checkpoint import Checkpoint
from captioner.concepts import concept_logits_for
from captioner.config import DecodeConfig, RerankConfig
from captioner.data.records import CaptionRecord
from captioner.decoding.captions import Caption, decode_features
from captioner.decoding.ensemble import load_decoder
from captioner.decoding.memory import CaptionMemory, build_memory
from captioner.decoding.rerank import ConsensusReranker, reranker_for
from captioner.encoders.registry import EncoderUnavailableError, checkpoint_encoder
from captioner.evaluation.coco_eval import run_coco_eval
from captioner.evaluation.report import write_html_report
from captioner.features.records import record_features
from captioner.images import DEFAULT_MAX_PIXELS
from captioner.metrics import METRIC_NAMES, captions_by_image, compute_scores
from captioner.metrics.nltk_bleu import NLTK_BLEU_LABEL, TOKENISATION, nltk_corpus_bleu
from captioner.utils import resolve_device, write_text_atomic

DECODE_BATCH = 250  # images per decoder call


@dataclass(frozen=True)
class EvaluationSettings:
    """Where `evaluate_checkpoint` gets features and re-ranking from, and what it writes.

    features_dirs: feature caches to read instead of running the CNN (each checkpoint reads the one its
    encoder made). memory: re-rank beam candidates by consensus (`captioner.decoding.rerank`) with a caption
    memory (a file, a `CaptionMemory`, or "train" to build one from the dataset's train split); it must hold
    none of the scored split's images. max_pixels: the most pixels decoded per image when the CNN runs."""

    out_dir: str | Path | None = None
    features_dirs: tuple[str | Path, ...] = ()
    batch_size: int = 64
    device: str = "auto"
    coco_eval: bool = False
    html: bool = True
    quiet: bool = False
    memory: str | Path | CaptionMemory | None = None
    rerank: RerankConfig | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Scores ×100 as an aligned text table, one row per named result ("-" where a row lacks a metric)."""
    name_width = max(12, *(len(name) for name in rows))
    lines = [f"{'':{name_width}}" + "".join(f"{m:>9}" for m in METRIC_NAMES)]
    for name, scores in rows.items():
        lines.append(f"{name:{name_width}}" + "".join(f"{scores[m] * 100:9.1f}" if m in scores else f"{'-':>9}"
                                                      for m in METRIC_NAMES))
    return "\n".join(lines)


def coco_result_id(record: CaptionRecord) -> int | str:
    """The id to write in COCO results: the annotation file's numeric id when there is one."""
    return record.source_id if record.source_id is not None else record.image_id


def join_member_features(records: list[CaptionRecord],
                         per_member: list[tuple[list[CaptionRecord], torch.Tensor, list[str]]]
                         ) -> tuple[list[CaptionRecord], torch.Tensor, list[str]]:
    """Keep the images every member has a feature for; their features side by side, in member order."""
    if len(per_member) == 1:
        return per_member[0]
    common = set.intersection(*({r.image_id for r in kept} for kept, _, _ in per_member))
    columns = []
    for kept, features, _ in per_member:
        row = {r.image_id: i for i, r in enumerate(kept)}
        columns.append(features[[row[r.image_id] for r in records if r.image_id in common]])
    problems = sorted({problem for _, _, member_problems in per_member for problem in member_problems})
    return [r for r in records if r.image_id in common], torch.cat(columns, dim=1), problems


def checkpoint_concept_logits(checkpoint: Checkpoint, features: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(ImageNet logits (N, 1000) of the checkpoint's CNN features from that CNN's own classifier, "") or
    (None, why not): the CNN cannot be built here, or has no ImageNet classifier. Works on cached features:
    only the classifier runs."""
    try:
        # unfused: only the classifier is used, so folding BatchNorm (and checking the fold) would be wasted
        encoder = checkpoint_encoder(checkpoint.encoder, str(checkpoint.path), checkpoint.encoder_state,
                                     fuse_batchnorm=False)
    except (EncoderUnavailableError, ValueError) as error:
        return None, f"the checkpoint's CNN could not be built for its ImageNet classifier ({error})"
    logits = concept_logits_for(encoder, features)
    return logits, "" if logits is not None else f"{encoder.name} has no ImageNet classifier"


def evaluate_checkpoint(checkpoint_path: str | Path | list[str | Path], dataset: Any, split: str,
                        config: DecodeConfig, settings: EvaluationSettings | None = None) -> dict[str, Any]:
    """Decode and score one split; print the table; write the report files when `settings.out_dir` is given.

    Several checkpoints (a list) are decoded jointly as an ensemble (`captioner.decoding.ensemble`)."""
    settings = settings or EvaluationSettings()
    device = resolve_device(settings.device)
    paths = list(checkpoint_path) if isinstance(checkpoint_path, (list, tuple)) else [checkpoint_path]
    model, checkpoints = load_decoder(paths, device=device)
    checkpoint = checkpoints[0]
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the dataset has no {split!r} images")
    started = time.perf_counter()
    records, features, problems = join_member_features(records, [
        record_features(records, member.encoder, settings.features_dirs, settings.batch_size, device,
                        member.encoder_state, settings.max_pixels)
        for member in checkpoints])
    for problem in problems:
        print(f"warning: skipped {problem}")
    feature_seconds = time.perf_counter() - started
    reranker = evaluation_reranker(settings, dataset, checkpoints, records, split, device)
    concept_logits, concepts_off = None, "off (concept_threshold None)"
    if config.concept_threshold is not None:
        # an ensemble's concepts come from its first member's CNN, whose features come first
        concept_logits, concepts_off = checkpoint_concept_logits(
            checkpoint, features[:, :checkpoint.model.config.feature_dim])
        if concept_logits is None:
            print(f"warning: concepts off: {concepts_off}")
    decode_start = time.perf_counter()
    captions = decode_features(model, checkpoint.vocab, features, config, batch_size=DECODE_BATCH,
                               reranker=reranker, concept_logits=concept_logits)
    decode_seconds = time.perf_counter() - decode_start
    references, hypotheses = captions_by_image(records, captions)
    scores = compute_scores(references, hypotheses)
    corpus = {m: scores[m] for m in METRIC_NAMES}
    tutorial_bleu = nltk_corpus_bleu(references, hypotheses)  # beside the headline, for tutorial readers
    label = f"beam {config.beam_size}" if config.strategy == "beam" else config.strategy
    if reranker is not None:
        label = f"beam {reranker.config.candidates} + consensus re-ranking"
    rows = {label: corpus}
    concepts_report: dict[str, Any] = {"used": False, "why_not": concepts_off}
    if concept_logits is not None:
        def without_concepts(rows: list[int]) -> list[list[Caption]]:
            return decode_features(model, checkpoint.vocab, features[rows], replace(config, concept_threshold=None),
                                   batch_size=DECODE_BATCH, reranker=reranker)

        concepts_report = concepts_section(config, records, captions, corpus, without_concepts)
        rows = {f"{label}, concepts p>={config.concept_threshold:g}": corpus,
                f"{label}, concepts off": concepts_report["scores_concepts_off"]}
    report = {
        "split": split, "images": len(records), "skipped_images": problems, "scores": corpus,
        "nltk_bleu": {"label": NLTK_BLEU_LABEL, "tokenisation": TOKENISATION, "smoothing": "none",
                      "scores": tutorial_bleu},
        "decoding": asdict(config), "concepts": concepts_report, "checkpoint": str(checkpoint.path),
        **({"rerank": {**asdict(reranker.config), "memory_images": len(reranker.memory)}} if reranker else {}),
        "checkpoint_sha256": file_fingerprint(checkpoint.path), "data": getattr(dataset, "source", None),
        "data_fingerprint": dataset.fingerprint(), "encoder": checkpoint.encoder,
        **({"ensemble": [{"checkpoint": str(c.path), "checkpoint_sha256": file_fingerprint(c.path),
                          "encoder": c.encoder} for c in checkpoints]} if len(checkpoints) > 1 else {}),
        "seconds": {"features": round(feature_seconds, 2), "decoding": round(decode_seconds, 2)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device)},
    }
    if not settings.quiet:
        name = str(checkpoint.path) if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)} checkpoints"
        print(f"{name} on {split} ({len(records)} images), {label}:")
        print(format_table({**rows, NLTK_BLEU_LABEL: tutorial_bleu}))
    if settings.coco_eval:
        report["coco_eval"] = run_coco_eval(references, hypotheses)
    if settings.out_dir is not None:
        write_report_files(Path(settings.out_dir), report, records, captions, scores, settings,
                           title=f"{Path(checkpoint.path).name} on {split}")
    return report


def evaluation_reranker(settings: EvaluationSettings, dataset: Any, checkpoints: list[Checkpoint],
                        records: list[CaptionRecord], split: str, device: torch.device) -> ConsensusReranker | None:
    """The consensus reranker `settings.memory` asks for (None without one), refused for an ensemble or
    when the memory holds images of the scored split."""
    memory = settings.memory
    if memory is None:
        return None
    if len(checkpoints) > 1:
        raise ValueError("consensus re-ranking works with one checkpoint, not an ensemble")
    checkpoint = checkpoints[0]
    if isinstance(memory, str) and memory == "train":
        memory = build_memory(dataset, "train", checkpoint, list(settings.features_dirs), settings.batch_size,
                              device, settings.max_pixels)
    reranker = reranker_for(memory, checkpoint.encoder, str(checkpoint.path), settings.rerank)
    reranker.memory.check_disjoint([r.image_id for r in records], split)
    return reranker


def concepts_section(config: DecodeConfig, records: list[CaptionRecord], captions: list[list[Caption]],
                     corpus: dict[str, float], decode_without_concepts: Callable[[list[int]], list[list[Caption]]]
                     ) -> dict[str, Any]:
    """The report's "concepts" entry: how many images had concepts and were constrained, and the scores with
    concepts off. Only constrained images can caption differently without concepts, so only they are
    decoded again (`decode_without_concepts(rows)` -> their captions); the others keep theirs."""
    with_concepts = [c[0].concepts if c else [] for c in captions]
    constrained = [row for row, c in enumerate(captions) if c and c[0].constraints_met is not None]
    section: dict[str, Any] = {
        "used": True, "threshold": config.concept_threshold, "max_constraints": config.max_constraints,
        "images_with_concepts": sum(bool(c) for c in with_concepts), "concepts": sum(len(c) for c in with_concepts),
        "images_constrained": len(constrained),
        "constraints_met": sum(bool(captions[row][0].constraints_met) for row in constrained)}
    if not constrained:
        section["scores_concepts_off"] = dict(corpus)
        return section
    off_start = time.perf_counter()
    off_captions = list(captions)
    for row, row_captions in zip(constrained, decode_without_concepts(constrained), strict=True):
        off_captions[row] = row_captions
    section["decoding_seconds_concepts_off"] = round(time.perf_counter() - off_start, 2)
    off_scores = compute_scores(*captions_by_image(records, off_captions))
    section["scores_concepts_off"] = {m: off_scores[m] for m in METRIC_NAMES}
    return section


def write_report_files(out: Path, report: dict[str, Any], records: list[CaptionRecord],
                       captions: list[list[Caption]], scores: dict[str, Any], settings: EvaluationSettings,
                       title: str) -> None:
    """predictions.json (COCO results), report.json and, unless `settings.html` is False, report.html."""
    predictions = [{"image_id": coco_result_id(r), "caption": c[0].text} for r, c in zip(records, captions, strict=True)]
    write_text_atomic(out / "predictions.json", json.dumps(predictions, ensure_ascii=False))
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    if settings.html:
        per_image = scores["per_image"]  # {image_id: {metric: value}}
        items = [{"image_id": r.image_id, "image_path": r.image_path, "caption": c[0].text,
                  "references": r.captions, "cider": per_image[r.image_id]["CIDEr-D"]}
                 for r, c in zip(records, captions, strict=True)]
        notes = {f"{NLTK_BLEU_LABEL}, BLEU-1..4 ×100": " / ".join(
            f"{value * 100:.1f}" for value in report["nltk_bleu"]["scores"].values())}
        concepts = report["concepts"]
        if concepts["used"]:
            notes[f"concepts (p ≥ {concepts['threshold']:g}) off, ×100"] = "  ".join(
                f"{m} {v * 100:.1f}" for m, v in concepts["scores_concepts_off"].items())
        write_html_report(out / "report.html", items, title=title, scores=report["scores"], notes=notes)
    if not settings.quiet:
        print(f"wrote {out}/report.json, predictions.json" + (", report.html" if settings.html else ""))
