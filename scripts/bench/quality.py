"""Caption quality on the Flickr8k test split, side by side with honest baselines and the classic papers.

    python scripts/bench/quality.py checkpoints/flickr8k-lite0 --features runs/features-flickr8k-lite0

Prints one table (BLEU-1..4, CIDEr-D, ROUGE-L, ×100, scored by captioner.metrics, which matches
coco-caption) with these rows:
  nearest neighbour   each test image gets the first caption of the training image whose CNN feature is most
                      similar (cosine), a retrieval baseline with no language model at all;
  image-blind LM      the first checkpoint's decoder fed an all-zero image feature (beam 3): what the
                      language prior alone writes, the same sentence for every image;
  <checkpoint>        each checkpoint given, decoded greedy, beam 3 and beam 5;
  ensemble            with --ensemble, all checkpoints decoded jointly (beam 3);
  + re-ranking        with --rerank, each checkpoint's beam candidates re-ranked by consensus with a caption
                      memory of the training split (`captioner.rerank`, default settings);
  literature          published Flickr8k test scores (Xu et al. 2015, Table 1), for reference only: their
                      BLEU came from other tokenisation and code, and they report no CIDEr-D or ROUGE-L.

Nothing is trained. Features come from caches made by `captioner features` (each checkpoint reads the
cache its encoder made; the nearest-neighbour row uses the first cache); a checkpoint that carries its own
fine-tuned CNN reads a cache of that CNN (`captioner features --from-checkpoint`) when one is given, else
runs it on the images. `--split val` scores val instead
(choose settings there; score test once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint
from captioner.config import DecodeConfig
from captioner.data import load_dataset
from captioner.evaluation import join_member_features
from captioner.features import FeatureCache, record_features
from captioner.inference import decode_features
from captioner.metrics import METRIC_NAMES, score_captions

LITERATURE = {  # Flickr8k test, BLEU-1..4 ×100, Xu et al. 2015 ("Show, Attend and Tell"), Table 1
    "Show and Tell (Vinyals et al. 2015)": {"BLEU-1": 63.0},
    "Karpathy & Fei-Fei 2015": {"BLEU-1": 57.9, "BLEU-2": 38.3, "BLEU-3": 24.5, "BLEU-4": 16.0},
    "Soft attention (Xu et al. 2015)": {"BLEU-1": 67.0, "BLEU-2": 44.8, "BLEU-3": 29.9, "BLEU-4": 19.5},
    "Hard attention (Xu et al. 2015)": {"BLEU-1": 67.0, "BLEU-2": 45.7, "BLEU-3": 31.4, "BLEU-4": 21.3},
}


def nearest_neighbour(train, train_features, test_features) -> list[str]:
    """The first reference caption of the most similar training image (cosine similarity of features)."""
    train_unit = torch.nn.functional.normalize(train_features.float(), dim=1)
    test_unit = torch.nn.functional.normalize(test_features.float(), dim=1)
    nearest = (test_unit @ train_unit.T).argmax(dim=1).tolist()
    return [train[i].captions[0] for i in nearest]


def row(scores: dict) -> dict[str, float]:
    return {metric: scores[metric] * 100 for metric in METRIC_NAMES}


def format_rows(rows: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [f"{'':{width}}" + "".join(f"{metric:>9}" for metric in METRIC_NAMES)]
    for name, scores in rows.items():
        cells = "".join(f"{scores[m]:9.1f}" if m in scores else f"{'-':>9}" for m in METRIC_NAMES)
        lines.append(f"{name:{width}}" + cells)
    return "\n".join(lines)


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
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    dataset = load_dataset(args.data, images_dir=args.images)
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

    checkpoints = [load_checkpoint(path) for path in args.checkpoints]
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

    for number, checkpoint in enumerate(checkpoints, 1):
        records, features, problems = member_features(checkpoint)
        if problems:
            print(f"warning: {len(problems)} {args.split} images have no feature, e.g. {problems[0]}", file=sys.stderr)
        label = Path(checkpoint.path).parent.name + "/" + Path(checkpoint.path).stem
        if args.checkpoints.count(args.checkpoints[number - 1]) > 1:
            label += f" #{number}"  # the same file twice (a sanity check): keep both rows
        for beam_size in (int(b) for b in args.beam_sizes.split(",")):
            config = DecodeConfig(strategy="greedy") if beam_size == 1 else DecodeConfig(strategy="beam",
                                                                                        beam_size=beam_size)
            captions = decode_features(checkpoint.model, checkpoint.vocab, features, config)
            score(f"{label} " + ("greedy" if beam_size == 1 else f"beam {beam_size}"), records,
                  [c[0].text for c in captions])
        if args.rerank:
            from captioner.evaluation import build_memory
            from captioner.rerank import reranker_for

            memory = build_memory(dataset, "train", checkpoint, caches_for(checkpoint), 64, device)
            reranker = reranker_for(memory, checkpoint.encoder, str(checkpoint.path))
            reranker.memory.check_disjoint([r.image_id for r in records], args.split)
            captions = decode_features(checkpoint.model, checkpoint.vocab, features, beam3, reranker=reranker)
            score(f"{label} beam {reranker.config.candidates} + re-ranking", records, [c[0].text for c in captions])

    if args.ensemble and len(checkpoints) > 1:
        from captioner.ensemble import EnsembleDecoder

        records, features, _ = join_member_features(split, [member_features(c) for c in checkpoints])
        ensemble = EnsembleDecoder([c.model for c in checkpoints]).eval()
        captions = decode_features(ensemble, first.vocab, features, beam3)
        score(f"ensemble of {len(checkpoints)} (beam 3)", records, [c[0].text for c in captions])

    rows.update({f"{name} [paper]": scores for name, scores in LITERATURE.items()})
    print(f"Flickr8k {args.split} ({len(split)} images); ours scored by captioner.metrics; "
          f"{platform.machine()}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"split": args.split, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
