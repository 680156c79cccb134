"""Score a checkpoint on a dataset split the way the papers do, and write the report files.

Every image of the split is decoded for real (batched), its caption scored against all of its
references with BLEU-1..4, CIDEr-D and ROUGE-L (captioner.metrics, which agrees with coco-caption),
with nltk's corpus_bleu beside them for comparison with tutorials (captioner.metrics.nltk_bleu),
and the out folder receives:
  report.json        scores, decoding settings, checkpoint and data fingerprints, image count, timing
  predictions.json   COCO results format [{"image_id", "caption"}], scorable by the official toolkit
  report.html        the best and worst images by per-image CIDEr-D, with captions and references

With concepts on (the default DecodeConfig), the captions use the concepts the checkpoint's CNN recognises
(its ImageNet classifier applied to the features, cached or computed), and the split is decoded a second
time with concepts off, so the report and the printed table show both.

`validate` is the same real decoding and scoring on val features, as the trainer calls it after every
epoch (never teacher-forced), split over the ranks under torchrun.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from captioner import distributed
from captioner.checkpoint import Checkpoint
from captioner.concepts import concept_logits_for
from captioner.config import DecodeConfig
from captioner.data.records import CaptionRecord
from captioner.encoders.registry import EncoderUnavailableError, checkpoint_encoder
from captioner.ensemble import load_decoder
from captioner.features.records import record_features
from captioner.images import DEFAULT_MAX_PIXELS
from captioner.inference import decode_features
from captioner.metrics import METRIC_NAMES, captions_by_image, compute_scores, score_captions
from captioner.metrics.nltk_bleu import NLTK_BLEU_LABEL, TOKENISATION, nltk_corpus_bleu
from captioner.model import CaptionDecoder
from captioner.rerank import CaptionMemory, RerankConfig, reranker_for
from captioner.text import Vocabulary
from captioner.utils import resolve_device, write_text_atomic


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


def build_memory(dataset: Any, split: str, checkpoint: Any, features_dirs: list[str | Path], batch_size: int,
                 device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS) -> CaptionMemory:
    """A caption memory of one split's images (features from a matching cache, else the checkpoint's CNN)."""
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the dataset has no {split!r} images to build a caption memory from")
    records, features, problems = record_features(records, checkpoint.encoder, features_dirs, batch_size,
                                                  device, checkpoint.encoder_state, max_pixels)
    for problem in problems:
        print(f"warning: left out of the memory: {problem}")
    return CaptionMemory.build(records, features, checkpoint.encoder)


def evaluate_checkpoint(checkpoint_path: str | Path | list[str | Path], dataset: Any, split: str,
                        config: DecodeConfig, out_dir: str | Path | None = None,
                        features_dir: str | Path | list[str | Path] | None = None,
                        batch_size: int = 64, device: str = "auto", coco_eval: bool = False,
                        html: bool = True, quiet: bool = False, memory: str | Path | CaptionMemory | None = None,
                        rerank: RerankConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode and score one split; print the table; write the report files when `out_dir` is given.

    Several checkpoints (a list) are decoded jointly as an ensemble (`captioner.ensemble`); each reads
    its features from the cache in `features_dir` (one or a list) that its encoder made.
    `memory`: re-rank beam candidates by consensus (`captioner.rerank`) with a caption memory (a file, a
    `CaptionMemory`, or "train" to build one from the dataset's train split); it must hold none of the
    scored split's images. `max_pixels`: the most pixels decoded per image when the CNN runs on images.
    """
    device_ = resolve_device(device)
    paths = list(checkpoint_path) if isinstance(checkpoint_path, (list, tuple)) else [checkpoint_path]
    features_dirs = (list(features_dir) if isinstance(features_dir, (list, tuple))
                     else [] if features_dir is None else [features_dir])
    model, checkpoints = load_decoder(paths, device=device_)
    checkpoint = checkpoints[0]
    records = dataset.split(split)
    if not records:
        raise ValueError(f"the dataset has no {split!r} images")
    started = time.perf_counter()
    records, features, problems = join_member_features(records, [
        record_features(records, member.encoder, features_dirs, batch_size, device_, member.encoder_state,
                        max_pixels)
        for member in checkpoints])
    for problem in problems:
        print(f"warning: skipped {problem}")
    feature_seconds = time.perf_counter() - started
    reranker = None
    if memory is not None:
        if len(checkpoints) > 1:
            raise ValueError("consensus re-ranking works with one checkpoint, not an ensemble")
        if isinstance(memory, str) and memory == "train":
            memory = build_memory(dataset, "train", checkpoint, features_dirs, batch_size, device_, max_pixels)
        reranker = reranker_for(memory, checkpoint.encoder, str(checkpoint.path), rerank)
        reranker.memory.check_disjoint([r.image_id for r in records], split)
    concept_logits, concepts_off = None, "off (concept_threshold None)"
    if config.concept_threshold is not None:
        # an ensemble's concepts come from its first member's CNN, whose features come first
        concept_logits, concepts_off = checkpoint_concept_logits(
            checkpoint, features[:, :checkpoint.model.config.feature_dim])
        if concept_logits is None:
            print(f"warning: concepts off: {concepts_off}")
    decode_start = time.perf_counter()
    captions = decode_features(model, checkpoint.vocab, features, config, batch_size=250, reranker=reranker,
                               concept_logits=concept_logits)
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
        with_concepts = [c[0].concepts if c else [] for c in captions]
        constrained = [c[0].constraints_met for c in captions if c and c[0].constraints_met is not None]
        concepts_report = {"used": True, "threshold": config.concept_threshold,
                           "max_constraints": config.max_constraints,
                           "images_with_concepts": sum(bool(c) for c in with_concepts),
                           "concepts": sum(len(c) for c in with_concepts),
                           "images_constrained": len(constrained), "constraints_met": sum(constrained)}
        if constrained:  # only constrained beam search changes captions; otherwise the second decode is the same
            off_start = time.perf_counter()
            off_captions = decode_features(model, checkpoint.vocab, features, replace(config, concept_threshold=None),
                                           batch_size=250, reranker=reranker)
            concepts_report["decoding_seconds_concepts_off"] = round(time.perf_counter() - off_start, 2)
            off_scores = compute_scores(references, captions_by_image(records, off_captions)[1])
            concepts_report["scores_concepts_off"] = {m: off_scores[m] for m in METRIC_NAMES}
        else:
            concepts_report["scores_concepts_off"] = dict(corpus)
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
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": str(device_)},
    }
    if not quiet:
        name = str(checkpoint.path) if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)} checkpoints"
        print(f"{name} on {split} ({len(records)} images), {label}:")
        print(format_table({**rows, NLTK_BLEU_LABEL: tutorial_bleu}))
    if coco_eval:
        report["coco_eval"] = run_coco_eval(references, hypotheses)
    if out_dir is not None:
        out = Path(out_dir)
        predictions = [{"image_id": coco_result_id(r), "caption": c[0].text} for r, c in zip(records, captions, strict=True)]
        write_text_atomic(out / "predictions.json", json.dumps(predictions, ensure_ascii=False))
        write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
        if html:
            from captioner.report import write_html_report

            per_image = scores["per_image"]  # {image_id: {metric: value}}
            items = [{"image_id": r.image_id, "image_path": r.image_path, "caption": c[0].text,
                      "references": r.captions, "cider": per_image[r.image_id]["CIDEr-D"]}
                     for r, c in zip(records, captions, strict=True)]
            notes = {f"{NLTK_BLEU_LABEL}, BLEU-1..4 ×100": " / ".join(
                f"{value * 100:.1f}" for value in tutorial_bleu.values())}
            if concept_logits is not None:
                notes[f"concepts (p ≥ {config.concept_threshold:g}) off, ×100"] = "  ".join(
                    f"{m} {v * 100:.1f}" for m, v in concepts_report["scores_concepts_off"].items())
            write_html_report(out / "report.html", items, title=f"{Path(checkpoint.path).name} on {split}",
                              scores=corpus, notes=notes)
        if not quiet:
            print(f"wrote {out}/report.json, predictions.json" + (", report.html" if html else ""))
    return report


def validate(model: CaptionDecoder, vocab: Vocabulary, records: list[CaptionRecord], features: torch.Tensor,
             config: DecodeConfig) -> dict[str, float]:
    """Decode the val images for real (never teacher-forced) with `config` and score them: BLEU-4 and CIDEr-D.

    Under torchrun the ranks decode a share each, rank 0 scores all of them and every rank returns the
    scores, so all ranks agree on the best epoch and on stopping."""
    texts = decode_across_ranks(model, vocab, features, config)
    scores = None
    if distributed.is_main():
        all_scores = score_captions(records, texts)
        scores = {"BLEU-4": all_scores["BLEU-4"], "CIDEr-D": all_scores["CIDEr-D"]}
    return distributed.broadcast_object(scores)


def decode_across_ranks(model: CaptionDecoder, vocab: Vocabulary, features: torch.Tensor,
                        config: DecodeConfig) -> list[str]:
    """The best caption of every row of `features`, in row order, on every rank; under torchrun rank r
    decodes rows r, r+W, r+2W, ... and the shares are gathered."""
    world, rank = distributed.world_size(), distributed.rank()
    captions = decode_features(model, vocab, features[rank::world], config)
    shares = distributed.all_gather_object([c[0].text for c in captions])  # shares[k][i]: row k + i*W
    return [shares[row % world][row // world] for row in range(features.size(0))]


def run_coco_eval(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, Any]:
    """pycocoevalcap's own scorers with its PTB tokenizer and METEOR; both need Java."""
    import shutil

    missing = []
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        missing.append("the pycocoevalcap package (pip install pycocoevalcap)")
    if shutil.which("java") is None:
        missing.append("Java (its PTB tokenizer and METEOR run on the JVM)")
    if missing:
        message = "--coco-eval skipped: missing " + " and ".join(missing)
        print(message)
        return {"skipped": message}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in references})
    results: dict[str, float] = {}
    for scorer, names in ((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
                          (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])):
        score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score], strict=True):
            results[name] = float(value)
    print("COCOEvalCap: " + "  ".join(f"{k} {v * 100:.1f}" for k, v in results.items()))
    return results
