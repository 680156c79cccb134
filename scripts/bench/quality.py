"""Caption quality on the Flickr8k test split and on coco-dev's everyday photos, beside honest baselines.

    python scripts/bench/quality.py checkpoints/flickr8k-lite0 --features runs/features-flickr8k-lite0
    python scripts/bench/quality.py checkpoints/flickr8k-lite0 --features CACHE --tables coco-dev --cache runs/bench

Prints two tables, scored by captioner.metrics (BLEU and CIDEr-D match coco-caption; Obj-F1 is the
object-mention F1 of docs/metrics.md), ×100.

The Flickr8k table (BLEU-1..4, CIDEr-D, ROUGE-L, Obj-F1) has these rows:
  nearest neighbour   each test image gets the first caption of the training image whose CNN feature is most
                      similar (cosine), a retrieval baseline with no language model at all;
  image-blind LM      the first checkpoint's decoder fed an all-zero image feature (beam 3): what the
                      language prior alone writes, the same sentence for every image;
  <checkpoint>        each checkpoint given, decoded greedy, beam 3 and beam 5 without concepts, and beam 3
                      with concepts (the default decoding: made to name the confident concepts of the
                      checkpoint's own CNN's ImageNet head, at DecodeConfig's default threshold);
  ensemble            with --ensemble, all checkpoints decoded jointly (beam 3);
  + re-ranking        with --rerank, each checkpoint's beam candidates re-ranked by consensus with a caption
                      memory of the training split (`captioner.decoding.rerank`, default settings);
  literature          published Flickr8k test scores (Xu et al. 2015, Table 1), for reference only: their
                      BLEU came from other tokenisation and code, and they report no CIDEr-D or ROUGE-L.

The coco-dev table (`../shared/data/coco-dev`, 100 COCO photos, 5 captions each; BLEU-4, CIDEr-D and
object-mention F1 with its precision and recall) has these rows:
  nearest Flickr8k train photo   each photo gets a caption of the Flickr8k training image whose CNN feature
                      is most similar (cosine; the first checkpoint's CNN, training features from the
                      --features cache of that very CNN): of that image's 5 captions, the one with the
                      highest CIDEr-D against the other 4 (document frequencies of all training captions);
  one caption for all the most central Flickr8k training caption, the same for every photo: the one whose
                      CIDEr tf-idf n-gram vectors (n = 1..4) have the highest mean cosine with all the
                      other training captions' (`central_caption`);
  <checkpoint>        each checkpoint given, default decoding (DecodeConfig()); when DecodeConfig has
                      `concept_threshold` (concepts from the CNN's ImageNet head), two rows: concepts off
                      (None) and on (the default threshold, logits from the checkpoint's own CNN's head).
The photos go through each checkpoint's own CNN (`encode_images`), cached under --cache when given.

Nothing is trained, and nothing is chosen on coco-dev here: it is only scored. Flickr8k features come
from caches made by `captioner features` (each checkpoint reads the cache its encoder made; the
nearest-neighbour row uses the first cache); a checkpoint that carries its own fine-tuned CNN reads a
cache of that CNN (`captioner features --checkpoint`) when one is given, else runs it on the images.
`--split val` scores val instead (choose settings there; score test once).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.checkpoint import load_checkpoint
from captioner.concepts import imagenet_head
from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.data.records import CaptionRecord
from captioner.decoding import decode_features
from captioner.encoders import checkpoint_encoder
from captioner.evaluation.evaluate import checkpoint_concept_logits, join_member_features
from captioner.features import FeatureCache, encode_images, record_features
from captioner.metrics import METRIC_NAMES, CiderD, object_mention_f1, score_captions
from captioner.metrics.common import ngram_counts
from captioner.text import tokenize

COCO_DEV_COLUMNS = ("BLEU-4", "CIDEr-D", "Obj-F1", "Obj-P", "Obj-R")

LITERATURE = {  # Flickr8k test, BLEU-1..4 ×100, Xu et al. 2015 ("Show, Attend and Tell"), Table 1
    "Show and Tell (Vinyals et al. 2015)": {"BLEU-1": 63.0},
    "Karpathy & Fei-Fei 2015": {"BLEU-1": 57.9, "BLEU-2": 38.3, "BLEU-3": 24.5, "BLEU-4": 16.0},
    "Soft attention (Xu et al. 2015)": {"BLEU-1": 67.0, "BLEU-2": 44.8, "BLEU-3": 29.9, "BLEU-4": 19.5},
    "Hard attention (Xu et al. 2015)": {"BLEU-1": 67.0, "BLEU-2": 45.7, "BLEU-3": 31.4, "BLEU-4": 21.3},
}


def nearest_neighbour(train: Sequence[CaptionRecord], train_features: torch.Tensor, test_features: torch.Tensor,
                      choose: Callable[[CaptionRecord], str] = lambda record: record.captions[0]) -> list[str]:
    """A caption of the most similar training image (cosine similarity of features), for each test row:
    `choose(record)`, by default its first reference caption."""
    train_unit = torch.nn.functional.normalize(train_features.float(), dim=1)
    test_unit = torch.nn.functional.normalize(test_features.float(), dim=1)
    nearest = (test_unit @ train_unit.T).argmax(dim=1).tolist()
    return [choose(train[i]) for i in nearest]


def consensus_caption(captions: Sequence[str], cider: CiderD) -> str:
    """The caption with the highest CIDEr-D against the others of the same image (the first on a tie);
    `cider` has fixed document frequencies (built with the training references)."""
    if len(captions) < 2:
        return captions[0]
    tokens = [tokenize(caption) for caption in captions]
    scores = cider.score(tokens, [tokens[:i] + tokens[i + 1:] for i in range(len(tokens))])
    return captions[int(scores.argmax())]


def central_caption(captions: Sequence[str], n: int = 4) -> str:
    """The caption most like all the others: the highest mean cosine of CIDEr's tf-idf n-gram vectors
    (n = 1..`n`, each order normalised, idf over these captions) with every other caption's. Computed
    through the centroid, so it costs one pass, not one per pair. The first on a tie."""
    if not captions:
        raise ValueError("central_caption needs at least one caption")
    counts = [ngram_counts(tokenize(caption), n) for caption in captions]
    doc_freq = Counter(gram for caption_counts in counts for gram in caption_counts)
    log_total = math.log(len(captions))
    vectors = []  # per caption: {gram: weight}, each n-gram order scaled to unit length
    for caption_counts in counts:
        weights = {gram: count * (log_total - math.log(doc_freq[gram])) for gram, count in caption_counts.items()}
        norms = Counter()
        for gram, weight in weights.items():
            norms[len(gram)] += weight * weight
        vectors.append({gram: weight / math.sqrt(norms[len(gram)]) for gram, weight in weights.items()
                        if norms[len(gram)] > 0})
    total = Counter()
    for vector in vectors:
        total.update(vector)
    # mean over the others = (v·sum - v·v) / (count - 1); v·v is the number of non-empty orders
    best = max(range(len(captions)), key=lambda i: (sum(w * total[g] for g, w in vectors[i].items())
                                                     - sum(w * w for w in vectors[i].values()), -i))
    return captions[best]


def row(scores: dict) -> dict[str, float]:
    return {metric: scores[metric] * 100 for metric in METRIC_NAMES}


def format_rows(rows: dict[str, dict[str, float]], columns: Sequence[str] = METRIC_NAMES) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [f"{'':{width}}" + "".join(f"{metric:>9}" for metric in columns)]
    for name, scores in rows.items():
        cells = "".join(f"{scores[m]:9.1f}" if m in scores else f"{'-':>9}" for m in columns)
        lines.append(f"{name:{width}}" + cells)
    return "\n".join(lines)


def coco_dev_row(records: Sequence[CaptionRecord], captions: Sequence[str]) -> dict[str, float]:
    """BLEU-4, CIDEr-D and object-mention F1 / precision / recall, ×100."""
    scores = score_captions(records, captions)
    objects = object_mention_f1({r.image_id: r.captions for r in records},
                                {r.image_id: c for r, c in zip(records, captions, strict=True)})
    return {"BLEU-4": scores["BLEU-4"] * 100, "CIDEr-D": scores["CIDEr-D"] * 100, "Obj-F1": objects["f1"] * 100,
            "Obj-P": objects["precision"] * 100, "Obj-R": objects["recall"] * 100}


def concept_decoding() -> float | None:
    """The default concept threshold when decoding can use concepts (DecodeConfig.concept_threshold and
    decode_features(concept_logits=...) exist), else None."""
    fields = {f.name: f for f in dataclasses.fields(DecodeConfig)}
    if "concept_threshold" not in fields or "concept_logits" not in inspect.signature(decode_features).parameters:
        return None
    default = fields["concept_threshold"].default
    return default if isinstance(default, float) else 0.3


def photo_features(checkpoint, paths: list[Path], cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and ImageNet logits (N, 1000) of photos from the checkpoint's own CNN, through a
    safetensors file under `cache` named by the photo count and the CNN's weights hash."""
    weights_hash = checkpoint.encoder.get("weights_hash")  # checked against the CNN when it is built
    file = cache / f"coco-dev-{len(paths)}-{weights_hash}.safetensors" if cache and weights_hash else None
    if file is not None and file.is_file():
        tensors = load_file(str(file))
        return tensors["features"], tensors["logits"]
    encoder = checkpoint_encoder(checkpoint.encoder, str(checkpoint.path), checkpoint.encoder_state)
    encoded = encode_images(paths, encoder, batch_size=25)
    if encoded.failures:
        raise ValueError(f"photos that did not load: {[(str(paths[i]), why) for i, why in encoded.failures]}")
    with torch.inference_mode():
        logits = imagenet_head(encoder.model, encoder.feature_dim)(encoded.features)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": encoded.features.contiguous(), "logits": logits.contiguous()}, str(file))
    return encoded.features, logits


def checkpoint_label(checkpoints_given: list[str], number: int, checkpoint) -> str:
    label = Path(checkpoint.path).parent.name + "/" + Path(checkpoint.path).stem
    if checkpoints_given.count(checkpoints_given[number - 1]) > 1:
        label += f" #{number}"  # the same file twice (a sanity check): keep both rows
    return label


def coco_dev_table(args: argparse.Namespace, checkpoints: list, train: list[CaptionRecord]
                   ) -> tuple[dict[str, dict[str, float]], int]:
    """The coco-dev rows (see the module notes), each printed as it comes, and the number of photos."""
    records = load_dataset(args.coco_dev).require_split("test")  # a COCO file naming no split: all test
    paths = [r.image_path for r in records]
    cache = Path(args.cache) if args.cache else None
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, captions: list[str]) -> None:
        rows[name] = coco_dev_row(records, captions)
        print(f"  coco-dev {name}: " + ", ".join(f"{m} {rows[name][m]:.1f}" for m in COCO_DEV_COLUMNS[:3]),
              file=sys.stderr)

    first = checkpoints[0]
    wanted = (first.encoder.get("encoder"), first.encoder.get("weights_hash"))
    same_cnn = [d for d in args.features
                if (FeatureCache.open(d).meta.get("encoder"), FeatureCache.open(d).meta.get("weights_hash")) == wanted]
    if same_cnn:
        train_cache = FeatureCache.open(same_cnn[0])
        train_kept = [r for r in train if r.image_id in train_cache]
        cider = CiderD([[tokenize(c) for c in r.captions] for r in train_kept])
        features, _ = photo_features(first, paths, cache)
        score("nearest Flickr8k train photo", nearest_neighbour(
            train_kept, train_cache.get_batch([r.image_id for r in train_kept]), features,
            choose=lambda record: consensus_caption(record.captions, cider)))
    else:
        print(f"note: no --features cache of the first checkpoint's CNN {wanted}: nearest-neighbour row skipped",
              file=sys.stderr)
    central = central_caption([c for r in train for c in r.captions])
    print(f"  the most central training caption: {central!r}", file=sys.stderr)
    score("one caption for all", [central] * len(records))

    threshold = concept_decoding()
    if threshold is None:
        print("note: this DecodeConfig has no concept_threshold: no concepts on/off rows, default decoding only",
              file=sys.stderr)
    for number, checkpoint in enumerate(checkpoints, 1):
        label = checkpoint_label(args.checkpoints, number, checkpoint)
        features, logits = photo_features(checkpoint, paths, cache)
        if threshold is None:
            captions = decode_features(checkpoint.model, checkpoint.vocab, features, DecodeConfig())
            score(f"{label} default decoding", [c[0].text for c in captions])
            continue
        off = decode_features(checkpoint.model, checkpoint.vocab, features, DecodeConfig(concept_threshold=None))
        score(f"{label} concepts off", [c[0].text for c in off])
        on = decode_features(checkpoint.model, checkpoint.vocab, features, DecodeConfig(concept_threshold=threshold),
                             concept_logits=logits)
        score(f"{label} concepts on (p >= {threshold})", [c[0].text for c in on])
    return rows, len(records)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints to score (files or folders)")
    parser.add_argument("--data", default=os.environ.get("CAPTIONER_FLICKR8K", "../shared/data/flickr8k"))
    parser.add_argument("--images", default=None, help="image folder, when not beside the annotations")
    parser.add_argument("--features", nargs="+", required=True, help="feature caches (one per encoder used)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--beam-sizes", default="1,3,5", help="1 means greedy")
    parser.add_argument("--ensemble", action="store_true", help="also decode all checkpoints jointly (beam 3)")
    parser.add_argument("--rerank", action="store_true",
                        help="also re-rank each checkpoint's beam candidates with a memory of the train split")
    parser.add_argument("--tables", default="flickr8k,coco-dev", help="which tables: flickr8k, coco-dev or both")
    parser.add_argument("--coco-dev", default=os.environ.get("CAPTIONER_COCO_DEV", "../shared/data/coco-dev"),
                        help="coco-dev folder or its captions.json")
    parser.add_argument("--cache", default=None,
                        help="folder for the coco-dev photos' features and ImageNet logits, per CNN")
    parser.add_argument("--json", default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    tables = args.tables.split(",")
    if not tables or any(t not in ("flickr8k", "coco-dev") for t in tables):
        parser.error(f"--tables: a comma-separated choice of flickr8k and coco-dev, got {args.tables!r}")

    started = time.perf_counter()
    dataset = load_dataset(args.data, images_dir=args.images)
    train = dataset.split("train")
    checkpoints = [load_checkpoint(path) for path in args.checkpoints]
    results: dict[str, dict[str, dict[str, float]]] = {}
    if "flickr8k" in tables:
        results["flickr8k"] = flickr8k_table(args, dataset, checkpoints)
        print(f"Flickr8k {args.split} ({len(dataset.split(args.split))} images); ours scored by captioner.metrics; "
              f"{platform.machine()}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
        print(format_rows(results["flickr8k"]))
    if "coco-dev" in tables:
        coco_started = time.perf_counter()
        results["coco-dev"], photos = coco_dev_table(args, checkpoints, train)
        print(f"\ncoco-dev ({photos} COCO photos, never trained on); nearest neighbour and central caption from "
              f"Flickr8k train; {platform.machine()}, torch {torch.__version__}, "
              f"{time.perf_counter() - coco_started:.0f} s")
        print(format_rows(results["coco-dev"], COCO_DEV_COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "tables": results}, indent=2))
    return results


def flickr8k_table(args: argparse.Namespace, dataset, checkpoints: list) -> dict[str, dict[str, float]]:
    """The Flickr8k rows (see the module notes)."""
    split, train = dataset.split(args.split), dataset.split("train")
    device = torch.device("cpu")
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, records, captions: list[str]) -> None:
        scores = score_captions(records, captions)
        rows[name] = row(scores)
        print(f"  {name}: BLEU-4 {rows[name]['BLEU-4']:.1f}, CIDEr-D {rows[name]['CIDEr-D']:.1f}", file=sys.stderr)

    first_cache = FeatureCache.open(args.features[0])
    train_kept = [r for r in train if r.image_id in first_cache]
    split_kept = [r for r in split if r.image_id in first_cache]
    score("nearest neighbour (train)", split_kept, nearest_neighbour(
        train_kept, first_cache.get_batch([r.image_id for r in train_kept]),
        first_cache.get_batch([r.image_id for r in split_kept])))

    beam3 = DecodeConfig(strategy="beam", beam_size=3)
    first = checkpoints[0]
    blind = decode_features(first.model, first.vocab, torch.zeros(len(split), first.model.config.feature_dim), beam3)
    score("image-blind LM (beam 3)", split, [c[0].text for c in blind])

    def caches_for(checkpoint) -> list[str]:
        if checkpoint.encoder_state is None:
            return args.features
        # a checkpoint with its own (fine-tuned) CNN: only a cache of that CNN, else the CNN runs on the images
        wanted = checkpoint.encoder.get("weights_hash")
        return [d for d in args.features if FeatureCache.open(d).meta.get("weights_hash") == wanted]

    def member_features(checkpoint):
        return record_features(split, checkpoint.encoder, caches_for(checkpoint), 64, device,
                                       checkpoint.encoder_state)

    threshold = concept_decoding()
    concepts_note = ", concepts off" if threshold is not None else ""
    for number, checkpoint in enumerate(checkpoints, 1):
        records, features, problems = member_features(checkpoint)
        if problems:
            print(f"warning: {len(problems)} {args.split} images have no feature, e.g. {problems[0]}", file=sys.stderr)
        label = checkpoint_label(args.checkpoints, number, checkpoint)
        for beam_size in (int(b) for b in args.beam_sizes.split(",")):
            config = DecodeConfig(strategy="greedy") if beam_size == 1 else DecodeConfig(strategy="beam",
                                                                                        beam_size=beam_size)
            captions = decode_features(checkpoint.model, checkpoint.vocab, features, config)
            score(f"{label} " + ("greedy" if beam_size == 1 else f"beam {beam_size}") + concepts_note, records,
                  [c[0].text for c in captions])
        if threshold is not None:  # the default decoding: beam 3 made to name the CNN's confident concepts
            logits, why_not = checkpoint_concept_logits(checkpoint, features)
            if logits is None:
                print(f"note: {label}: no concepts row: {why_not}", file=sys.stderr)
            else:
                captions = decode_features(checkpoint.model, checkpoint.vocab, features,
                                           DecodeConfig(concept_threshold=threshold), concept_logits=logits)
                score(f"{label} beam 3 + concepts (p >= {threshold})", records, [c[0].text for c in captions])
        if args.rerank:
            from captioner.decoding.memory import build_memory
            from captioner.decoding.rerank import reranker_for

            memory = build_memory(dataset, "train", checkpoint, caches_for(checkpoint), 64, device)
            reranker = reranker_for(memory, checkpoint.encoder, str(checkpoint.path))
            reranker.memory.check_disjoint([r.image_id for r in records], args.split)
            captions = decode_features(checkpoint.model, checkpoint.vocab, features, beam3, reranker=reranker)
            score(f"{label} beam {reranker.config.candidates} + re-ranking", records, [c[0].text for c in captions])

    if args.ensemble and len(checkpoints) > 1:
        from captioner.decoding.ensemble import EnsembleDecoder

        records, features, _ = join_member_features(split, [member_features(c) for c in checkpoints])
        ensemble = EnsembleDecoder([c.model for c in checkpoints]).eval()
        captions = decode_features(ensemble, first.vocab, features, beam3)
        score(f"ensemble of {len(checkpoints)} (beam 3)", records, [c[0].text for c in captions])

    rows.update({f"{name} [paper]": scores for name, scores in LITERATURE.items()})
    return rows


if __name__ == "__main__":
    main()
