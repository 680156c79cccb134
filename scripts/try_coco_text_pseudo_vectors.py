"""Issue 16 experiment (open): COCO captions without photos as training data, each given a pseudo image
vector built from the ImageNet classifier's class directions of the objects it mentions.

For a COCO caption that names concept words, v = mean training feature + sum over its (at most 3)
concept words of t_w · d_w, where d_w is the unit direction of the mean classifier row of the word's
classes minus the mean row, and t_w is chosen so the classifier gives the word's classes `--target-p` of
the probability at that point. Captions that name no concept word are dropped. These text-only examples
train one decoder together with the Flickr8k pairs (features of the shipped checkpoint's own CNN, from
`captioner features --from-checkpoint`), then Flickr8k val and coco-dev are scored with beam 3.

The class -> word map here is deliberately crude (the last word of each torchvision class name when COCO
text uses it 20+ times; dog and domestic-cat index ranges): it predates the reviewed map in
captioner/concepts/, which a follow-up should use instead.

    captioner features --data ../shared/data/flickr8k --from-checkpoint checkpoints/flickr8k-lite0 --out runs/ft8k
    python scripts/try_coco_text_pseudo_vectors.py --features runs/ft8k --out runs/pseudo --epochs 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torchvision.models._meta import _IMAGENET_CATEGORIES as IMAGENET_CLASSES

from captioner.checkpoint import load_checkpoint
from captioner.config import DecodeConfig, TrainConfig
from captioner.data import load_dataset
from captioner.data.records import CaptionRecord
from captioner.encoders import get_encoder
from captioner.features.records import record_features
from captioner.inference import decode_features
from captioner.metrics import compute_scores
from captioner.text import tokenize
from captioner.train import cached_splits, train

DOG_CLASSES, CAT_CLASSES = range(151, 269), range(281, 286)


def crude_word_map(counts: Counter) -> dict[str, list[int]]:
    """concept word -> ImageNet class indices (see the module docstring)."""
    word_classes: dict[str, list[int]] = {}
    for index, name in enumerate(IMAGENET_CLASSES):
        tokens = tokenize(name)
        word = ("dog" if index in DOG_CLASSES else "cat" if index in CAT_CLASSES else
                tokens[-1] if tokens and counts[tokens[-1]] >= 20 else None)
        if word:
            word_classes.setdefault(word, []).append(index)
    return word_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/flickr8k-lite0")
    parser.add_argument("--shared", default="../shared/data", help="folder with flickr8k/, coco-text/, coco-dev/")
    parser.add_argument("--features", required=True, help="Flickr8k feature cache of the checkpoint's CNN")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--target-p", type=float, default=0.6)
    parser.add_argument("--val-max", type=int, default=300, help="val images scored during training")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(args.shared)

    checkpoint = load_checkpoint(args.checkpoint)
    splits = cached_splits(load_dataset(shared / "flickr8k"), args.features)
    mean_feature = splits["train_features"].float().mean(0)

    coco = json.loads((shared / "coco-dev" / "captions.json").read_text())
    references: dict[int, list[str]] = {}
    for annotation in coco["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    dev_records = [CaptionRecord(str(image["id"]), shared / "coco-dev" / "images" / image["file_name"],
                                 references[image["id"]], "test", image["id"]) for image in coco["images"]]
    dev_kept, dev_features, problems = record_features(dev_records, checkpoint.encoder, [], 32, torch.device("cpu"),
                                                       checkpoint.encoder_state)
    if problems:
        raise SystemExit("\n".join(problems))

    head = get_encoder("efficientnet_lite0").model.model.classifier
    weight, bias = head.weight.detach().float(), head.bias.detach().float()  # (1000, 1280), (1000,)
    coco_text = json.loads((shared / "coco-text" / "coco_captions_text.json").read_text())["captions"]
    word_classes = crude_word_map(Counter(w for c in coco_text for w in tokenize(c["caption"])))
    mean_row = weight.mean(0)

    def probability(vector: torch.Tensor, classes: list[int]) -> float:
        return torch.softmax(weight @ vector + bias, 0)[classes].sum().item()

    direction, scale = {}, {}
    for word, classes in word_classes.items():
        unit = weight[classes].mean(0) - mean_row
        unit = unit / unit.norm()
        low, high = 0.0, 50.0
        for _ in range(30):  # bisect the step at which the word's classes reach target_p
            middle = (low + high) / 2
            low, high = (middle, high) if probability(mean_feature + middle * unit, classes) < args.target_p \
                else (low, middle)
        direction[word], scale[word] = unit, high
    print(f"{len(word_classes)} concept words from {sum(map(len, word_classes.values()))} classes", flush=True)

    def concept_words(tokens: list[str]) -> list[str]:
        found: list[str] = []
        for token in tokens:
            for candidate in (token, token[:-1] if token.endswith("s") else None,
                              token[:-2] if token.endswith("es") else None):
                if candidate and candidate in word_classes and candidate not in found:
                    found.append(candidate)
                    break
        return found

    text_records, text_features = [], []
    for index, entry in enumerate(coco_text):
        words = concept_words(tokenize(entry["caption"]))
        if not words:
            continue
        vector = mean_feature.clone()
        for word in words[:3]:
            vector = vector + scale[word] * direction[word]
        text_records.append(CaptionRecord(f"coco-text-{index}", Path("/nonexistent"), [entry["caption"]], "train"))
        text_features.append(vector)
    print(f"text-only captions with a concept word: {len(text_records)} of {len(coco_text)}", flush=True)

    started = time.time()
    best = train(splits["train_records"] + text_records,
                 torch.cat([splits["train_features"].float(), torch.stack(text_features)]),
                 splits["val_records"], splits["val_features"], args.out,
                 config=TrainConfig(epochs=args.epochs, seed=1, val_max_images=args.val_max, patience=100),
                 encoder=splits["encoder"], progress=False)
    print(f"trained in {time.time() - started:.0f} s", flush=True)

    model = load_checkpoint(best)
    decode = DecodeConfig(strategy="beam", beam_size=3, length_penalty=0.5)
    for name, records, features in (("Flickr8k val", splits["val_records"], splits["val_features"]),
                                    ("coco-dev", dev_kept, dev_features)):
        captions = decode_features(model.model, model.vocab, features.float(), decode)
        scores = compute_scores({r.image_id: r.captions for r in records},
                                {r.image_id: captions[i][0].text for i, r in enumerate(records)})
        print(f"{name}: CIDEr-D {100 * scores['CIDEr-D']:.1f}  BLEU-4 {100 * scores['BLEU-4']:.1f}", flush=True)


if __name__ == "__main__":
    main()
