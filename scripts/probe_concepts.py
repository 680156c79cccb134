"""How well ImageNet concepts name what people say, on coco-dev and Flickr8k val.

    python scripts/probe_concepts.py checkpoints/flickr8k-lite0 [--flickr-val 100] [--decode] [--no-compare]

1. Which CNN gives the logits: the checkpoint's fine-tuned CNN keeps the original ImageNet head; this
   compares it (fine-tuned trunk + original head) with the packaged ImageNet EfficientNet-Lite0 on the
   same photos: top-1 class agreement, top-1 concept agreement, and agreement of the concept sets at 0.3.
2. For thresholds 0.2 .. 0.6 and each CNN: how many photos get at least one concept, how many concepts,
   and their precision: the share of concepts that one of their forms appears in >= 1 / >= 2 of the
   photo's references (tokenised as the metrics do). "top" counts only each photo's best concept;
   "in vocab" counts the concepts that the checkpoint's vocabulary can say (some form in it).
3. With --decode: the checkpoint on coco-dev (and the Flickr8k val photos) with default decoding, plain
   beam search vs constrained beam search forced to mention up to 2 concepts (`constraint_concepts`,
   vocabulary words only) at each threshold; CIDEr-D and BLEU-4 from captioner.metrics, and how often
   the constraints were met. Decoding settings are DecodeConfig's defaults. docs/concepts.md has the tables
   this printed (its soft-guidance rows came from an earlier version of this script, with a guidance
   wrapper that was then removed from the library).

Nothing is trained; coco-dev is only scored. The photos go through each CNN once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.checkpoint import load_checkpoint
from captioner.concepts import (
    Concept,
    ConceptDetector,
    constraint_concepts,
    imagenet_head,
    load_concept_map,
    mentions,
)
from captioner.config import DecodeConfig
from captioner.decoding import beam_search
from captioner.encoders import Encoder, checkpoint_encoder, get_encoder
from captioner.features import encode_images
from captioner.metrics import compute_scores
from captioner.text import tokenize

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def coco_dev_photos(folder: Path) -> list[tuple[Path, list[str]]]:
    """(image path, reference captions) of coco-dev's captions.json, read as it is."""
    data = json.loads((folder / "captions.json").read_text())
    references: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [(folder / "images" / image["file_name"], references[image["id"]]) for image in data["images"]]


def flickr8k_val_photos(folder: Path, count: int) -> list[tuple[Path, list[str]]]:
    """The first `count` val photos of the Karpathy Flickr8k file, with their references."""
    data = json.loads((folder / "dataset_flickr8k.json").read_text())
    val = [image for image in data["images"] if image["split"] == "val"][:count]
    return [(folder / "images" / image["filename"], [s["raw"] for s in image["sentences"]]) for image in val]


def run_cnn(encoder: Encoder, paths: list[Path], batch: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) and ImageNet logits (N, 1000) from one pass of the CNN (the library's one
    route from image files to features, `encode_images`: the features every door decodes)."""
    head = imagenet_head(encoder.model, encoder.feature_dim)
    encoded = encode_images(paths, encoder, batch_size=batch)
    if encoded.failures:
        raise ValueError(f"photos that did not load: {[(str(paths[i]), reason) for i, reason in encoded.failures]}")
    with torch.inference_mode():
        return encoded.features, head(encoded.features)


def cached_cnn(encoder: Encoder, paths: list[Path], cache: Path | None, name: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """run_cnn, through a safetensors file named by the set, its size and the CNN's weights hash."""
    if cache is None:
        return run_cnn(encoder, paths)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    path = cache / f"{slug}-{len(paths)}-{encoder.weights_hash}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["features"], tensors["logits"]
    features, logits = run_cnn(encoder, paths)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous(), "logits": logits.contiguous()}, str(path))
    return features, logits


def precision_table(name: str, concepts_at: dict[float, list[list[Concept]]], references: list[list[str]],
                    vocab_index: dict[str, int]) -> None:
    concept_map = load_concept_map()
    tokenised = [[tokenize(r) for r in refs] for refs in references]
    print(f"\n{name}: {len(references)} photos")
    print(f"{'p >=':>5} {'photos':>6} {'concepts':>8} {'prec>=1':>7} {'prec>=2':>7} {'top>=1':>6} {'top>=2':>6} "
          f"{'in vocab':>8} {'voc>=1':>6} {'voc>=2':>6}")
    for threshold, per_photo in concepts_at.items():
        hits = {key: [0, 0] for key in ("all", "top", "vocab")}  # key -> [>= 1 refs, >= 2 refs]
        counts = {"all": 0, "top": 0, "vocab": 0}
        for concepts, refs in zip(per_photo, tokenised, strict=True):
            for rank, concept in enumerate(concepts):
                n_refs = sum(mentions(ref, concept.word, concept_map) for ref in refs)
                in_vocab = any(f in vocab_index for f in concept_map.forms[concept.word])
                for key, counted in (("all", True), ("top", rank == 0), ("vocab", in_vocab)):
                    if counted:
                        counts[key] += 1
                        hits[key][0] += n_refs >= 1
                        hits[key][1] += n_refs >= 2

        share = {(key, at): f"{hits[key][at] / counts[key]:.2f}" if counts[key] else "-"
                 for key in hits for at in (0, 1)}
        photos = sum(bool(c) for c in per_photo)
        print(f"{threshold:>5.1f} {photos:>6} {counts['all']:>8} {share['all', 0]:>7} {share['all', 1]:>7} "
              f"{share['top', 0]:>6} {share['top', 1]:>6} {counts['vocab']:>8} {share['vocab', 0]:>6} "
              f"{share['vocab', 1]:>6}")


def agreement(name: str, fine_logits: torch.Tensor, packaged_logits: torch.Tensor) -> None:
    detector = ConceptDetector(threshold=0.0, top_k=1)
    fine_top, packaged_top = detector(fine_logits), detector(packaged_logits)
    top1 = (fine_logits.argmax(1) == packaged_logits.argmax(1)).float().mean().item()
    concept1 = sum(a[0].word == b[0].word for a, b in zip(fine_top, packaged_top, strict=True)) / len(fine_top)
    at_03 = ConceptDetector(threshold=0.3, top_k=0)
    fine_sets = [{c.word for c in cs} for cs in at_03(fine_logits)]
    packaged_sets = [{c.word for c in cs} for cs in at_03(packaged_logits)]
    same = sum(a == b for a, b in zip(fine_sets, packaged_sets, strict=True)) / len(fine_sets)
    union = sum(len(a | b) for a, b in zip(fine_sets, packaged_sets, strict=True))
    jaccard = sum(len(a & b) for a, b in zip(fine_sets, packaged_sets, strict=True)) / max(union, 1)
    fine_max = fine_logits.softmax(1).amax(1).mean().item()
    packaged_max = packaged_logits.softmax(1).amax(1).mean().item()
    print(f"{name}: top-1 class agreement {top1:.2f}, top-1 concept agreement {concept1:.2f}, "
          f"same concept set at p>=0.3 {same:.2f} (pooled Jaccard {jaccard:.2f}); mean top-1 class p "
          f"fine-tuned {fine_max:.2f}, packaged {packaged_max:.2f}")


def decode_table(name: str, checkpoint, features: torch.Tensor, logits: torch.Tensor,
                 references: list[list[str]], thresholds: list[float], show: int, show_threshold: float) -> None:
    config = DecodeConfig()
    vocab = checkpoint.vocab
    suppress = (vocab.pad_id, vocab.start_id, vocab.unk_id)
    refs = {i: r for i, r in enumerate(references)}

    def scores(hypotheses) -> str:
        captions = {i: " ".join(vocab.decode(h[0].tokens)) for i, h in enumerate(hypotheses)}
        result = compute_scores(refs, captions)
        return f"CIDEr-D {100 * result['CIDEr-D']:5.1f}  BLEU-4 {100 * result['BLEU-4']:5.1f}"

    start = time.perf_counter()
    with torch.inference_mode():
        plain = beam_search(checkpoint.model, features, config, vocab.start_id, vocab.end_id, suppress)
    print(f"\n{name}, beam {config.beam_size}, length penalty {config.length_penalty}")
    print(f"  plain beam search:               {scores(plain)}  ({time.perf_counter() - start:.1f} s)")
    for threshold in thresholds:
        detected = ConceptDetector(threshold=threshold, top_k=0)(logits)
        chosen = [constraint_concepts(cs, 2, vocab.index) for cs in detected]
        constraints = [[[vocab.index[f] for f in load_concept_map().forms[c.word] if f in vocab.index]
                        for c in cs] for cs in chosen]
        start = time.perf_counter()
        results = beam_search(checkpoint.model, features, config, vocab.start_id, vocab.end_id, suppress,
                              constraints=constraints)
        seconds = time.perf_counter() - start
        constrained_photos = sum(bool(c) for c in constraints)
        met = sum(bool(c) and r[0].constraints_met for c, r in zip(constraints, results, strict=True))
        print(f"  constrained, p >= {threshold:.1f}: {scores(results)}  ({constrained_photos} photos "
              f"constrained, {met} met, {sum(len(c) for c in constraints)} constraints; {seconds:.1f} s)")
        if show and abs(threshold - show_threshold) < 1e-9:
            shown = [i for i, c in enumerate(chosen) if c][:show]
            for i in shown:
                words = ", ".join(f"{c.word} {c.p:.2f}" for c in chosen[i])
                print(f"    photo {i} [{words}]\n      plain:       {' '.join(vocab.decode(plain[i][0].tokens))}"
                      f"\n      constrained: {' '.join(vocab.decode(results[i][0].tokens))}"
                      f"\n      reference:   {references[i][0].strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/flickr8k-cocotext-lite0")
    parser.add_argument("--coco-dev", type=Path, default=SHARED / "coco-dev")
    parser.add_argument("--flickr8k", type=Path, default=SHARED / "flickr8k")
    parser.add_argument("--flickr-val", type=int, default=100, help="how many Flickr8k val photos (first N; 0: none)")
    parser.add_argument("--decode", action="store_true", help="also score plain vs constrained beam search")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                        help="concept probability thresholds to tabulate and decode with")
    parser.add_argument("--cache", type=Path, help="keep each photo set's features and logits here "
                        "(safetensors), and reuse them when the checkpoint's CNN is the same")
    parser.add_argument("--show", type=int, default=0, help="with --decode, print this many example captions")
    parser.add_argument("--show-threshold", type=float, default=0.3, help="the threshold of the examples shown")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the packaged CNN (agreement and its precision table)")
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.checkpoint)
    fine = checkpoint_encoder(checkpoint.encoder, str(args.checkpoint), state=checkpoint.encoder_state)
    packaged = get_encoder(checkpoint.encoder.get("encoder", "efficientnet_lite0"))
    print(f"checkpoint {args.checkpoint}: CNN {fine.name} {'fine-tuned' if checkpoint.encoder_state else 'packaged'}"
          f" (weights {fine.weights_hash}); packaged {packaged.weights_hash}; torch threads {torch.get_num_threads()}")
    sets = {"coco-dev": coco_dev_photos(args.coco_dev)}
    if args.flickr_val:
        sets[f"Flickr8k val (first {args.flickr_val})"] = flickr8k_val_photos(args.flickr8k, args.flickr_val)
    for name, photos in sets.items():
        paths, references = [p for p, _ in photos], [r for _, r in photos]
        start = time.perf_counter()
        fine_features, fine_logits = cached_cnn(fine, paths, args.cache, name)
        tables = [("fine-tuned trunk + original head", fine_logits)]
        if not args.no_compare:
            _, packaged_logits = run_cnn(packaged, paths)
            tables.append(("packaged ImageNet Lite0", packaged_logits))
        print(f"\n== {name} (CNNs: {time.perf_counter() - start:.0f} s)")
        if not args.no_compare:
            agreement(name, fine_logits, packaged_logits)
        for label, logits in tables:
            concepts_at = {t: ConceptDetector(threshold=t, top_k=0)(logits) for t in args.thresholds}
            precision_table(f"{name}, {label}", concepts_at, references, checkpoint.vocab.index)
        if args.decode:
            decode_table(name, checkpoint, fine_features, fine_logits, references, args.thresholds, args.show,
                         args.show_threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
