"""Metrics: hand-computed cases, edge cases, and agreement with pycocoevalcap on real Flickr8k references."""

from __future__ import annotations

import json
import math
import random

import pytest

from captioner.metrics import METRIC_NAMES, Bleu, CiderD, RougeL, compute_scores
from captioner.text import tokenize

TOLERANCE = 1e-6


# ---------------------------------------------------------------- hand-computed BLEU (no pycocoevalcap)

CAT_REFS = ["The cat is on the mat.", "There is a cat on the mat."]  # 6 and 7 tokens


def test_bleu_hand_computed_single_sentence():
    # hyp (7 tokens): clipped matches 5/7, 4/6, 2/5, 1/4; closest ref length 7 -> no brevity penalty.
    corpus, per_image = Bleu(4).compute_score({"a": CAT_REFS}, {"a": "the cat the cat on the mat"})
    p = [5 / 7, 4 / 6, 2 / 5, 1 / 4]
    expected = [math.prod(p[: k + 1]) ** (1 / (k + 1)) for k in range(4)]
    assert corpus == pytest.approx(expected, rel=1e-7)
    assert per_image["a"] == pytest.approx(expected, rel=1e-7)


def test_bleu_corpus_sums_counts_and_applies_one_brevity_penalty():
    refs = {"a": CAT_REFS, "b": CAT_REFS}
    hyps = {"a": "the cat the cat on the mat", "b": "the cat on the mat"}
    corpus, per_image = Bleu(4).compute_score(refs, hyps)

    # "b": 5 tokens, matches 5/5, 4/4, 2/3, 1/2; closest ref length 6 -> penalty exp(1 - 6/5).
    p_b = [1, 1, 2 / 3, 1 / 2]
    expected_b = [math.exp(1 - 6 / 5) * math.prod(p_b[: k + 1]) ** (1 / (k + 1)) for k in range(4)]
    assert per_image["b"] == pytest.approx(expected_b, rel=1e-7)

    # Corpus: counts summed over both images (10/12, 8/10, 4/8, 2/6), lengths 12 vs 7 + 6 = 13.
    p = [10 / 12, 8 / 10, 4 / 8, 2 / 6]
    expected = [math.exp(1 - 13 / 12) * math.prod(p[: k + 1]) ** (1 / (k + 1)) for k in range(4)]
    assert corpus == pytest.approx(expected, rel=1e-7)
    # ... which is not the mean of the per-image values.
    mean_bleu4 = (per_image["a"][3] + per_image["b"][3]) / 2
    assert abs(corpus[3] - mean_bleu4) > 1e-3


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # Refs of length 4 and 6, hypothesis of length 5: effective length 4, so no brevity penalty.
    corpus, _ = Bleu(1).compute_score({"a": ["a b c d", "a b c d e f"]}, {"a": "a b c d e"})
    assert corpus == pytest.approx([1.0], abs=1e-8)


# ---------------------------------------------------------------- edge cases

def test_empty_hypothesis_scores_zero():
    refs = {"a": ["a dog runs on the grass"], "b": ["a cat sleeps"]}
    scores = compute_scores(refs, {"a": "", "b": "a cat sleeps"})
    empty = scores["per_image"]["a"]
    assert all(empty[name] == pytest.approx(0.0, abs=1e-12) for name in METRIC_NAMES)
    assert scores["per_image"]["b"]["ROUGE-L"] == pytest.approx(1.0)


def test_all_hypotheses_empty():
    scores = compute_scores({"a": ["a dog"], "b": ["."]}, {"a": "", "b": "..."})
    assert all(scores[name] == pytest.approx(0.0, abs=1e-12) for name in METRIC_NAMES)


def test_single_image_cider_is_zero_but_others_are_not():
    # One image: every reference n-gram has df = 1 = number of images, so idf = 0 (see docs/metrics.md).
    scores = compute_scores({"a": ["a dog runs on the grass"]}, {"a": "a dog runs on the grass"})
    assert scores["CIDEr-D"] == 0.0
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)


def test_punctuation_and_capitals_are_normalised():
    refs = {"a": ["A dog runs on the grass .", "A brown dog is running"], "b": ["Two men play chess ."],
            "c": ["a girl in a pink dress"]}
    raw = {"a": "A Dog, running on the GRASS!", "b": "Two men playing chess...", "c": "A girl (in pink)."}
    normalised = {"a": "a dog running on the grass", "b": "two men playing chess", "c": "a girl in pink"}
    assert compute_scores(refs, raw) == compute_scores(refs, normalised)


def test_tokenized_flag_skips_tokenisation():
    refs = {"a": ["A dog runs on the grass ."], "b": ["Two men play chess ."]}
    hyps = {"a": "A dog, on grass.", "b": "Men play chess!"}
    tokenized_refs = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in refs.items()}
    tokenized_hyps = {i: " ".join(tokenize(h)) for i, h in hyps.items()}
    assert compute_scores(refs, hyps) == compute_scores(tokenized_refs, tokenized_hyps, tokenized=True)
    # Without tokenisation "dog," and "dog" differ, so the score drops.
    assert Bleu(1).compute_score(refs, hyps, tokenized=True)[0][0] < compute_scores(refs, hyps)["BLEU-1"]


def test_compute_scores_returns_plain_floats_and_per_image():
    refs = {1: ["a dog runs", "a dog is running"], 2: ["a cat sleeps on a sofa"]}
    scores = compute_scores(refs, {1: "a dog runs", 2: "a cat on a sofa"})
    assert set(scores) == {*METRIC_NAMES, "per_image"}
    assert all(type(scores[name]) is float for name in METRIC_NAMES)
    assert set(scores["per_image"]) == {1, 2}
    assert set(scores["per_image"][1]) == set(METRIC_NAMES)


def test_mismatched_ids_raise_and_name_the_ids():
    with pytest.raises(ValueError, match=r"no hypothesis.*'img2'.*no references.*'img3'"):
        compute_scores({"img1": ["a"], "img2": ["b"]}, {"img1": "a", "img3": "c"})
    for scorer in (Bleu(), CiderD(), RougeL()):
        with pytest.raises(ValueError, match="same image ids"):
            scorer.compute_score({"a": ["x"]}, {"b": "x"})


def test_image_without_references_raises():
    with pytest.raises(ValueError, match=r"references\['a'\] is empty"):
        compute_scores({"a": [], "b": ["x"]}, {"a": "x", "b": "x"})
    with pytest.raises(ValueError, match="list of caption strings"):
        compute_scores({"a": "a dog runs"}, {"a": "a dog"})


@pytest.mark.slow
def test_scores_1000_images_consistently():
    """At corpus scale (the speed is scripts/bench/scoring.py's): every image scored, corpus CIDEr-D and
    ROUGE-L the mean of the per-image scores, the order of the ids irrelevant, and copying a reference
    scores higher on every metric."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    refs = {i: [" ".join(rng.choices(words, k=rng.randint(8, 16))) for _ in range(5)] for i in range(1000)}
    hyps = {i: " ".join(rng.choices(words, k=rng.randint(5, 14))) for i in range(1000)}
    scores = compute_scores(refs, hyps)
    per_image = scores["per_image"]
    assert set(per_image) == set(refs)
    for name in ("CIDEr-D", "ROUGE-L"):
        assert scores[name] == pytest.approx(sum(s[name] for s in per_image.values()) / 1000, rel=1e-9)
    reordered = compute_scores(dict(reversed(refs.items())), dict(reversed(hyps.items())))
    for i in refs:
        assert reordered["per_image"][i] == pytest.approx(per_image[i], abs=1e-12), i
    copied = compute_scores(refs, {i: references[0] for i, references in refs.items()})
    # Obj-F1 aside: the made-up words name no COCO object, so both agree perfectly on "nothing there"
    assert all(copied[name] > scores[name] for name in METRIC_NAMES if name != "Obj-F1")
    assert copied["Obj-F1"] == scores["Obj-F1"] == 1.0


# ---------------------------------------------------------------- agreement with pycocoevalcap

@pytest.fixture(scope="module")
def flickr8k_test_references(flickr8k_dir) -> dict[str, list[str]]:
    data = json.loads((flickr8k_dir / "dataset_flickr8k.json").read_text())
    return {image["filename"]: [s["raw"] for s in image["sentences"]]
            for image in data["images"] if image["split"] == "test"}


def _varied_hypotheses(references: dict[str, list[str]], seed: int = 0) -> dict[str, str]:
    """One hypothesis per image, cycling through kinds that stress different parts of the metrics."""
    rng = random.Random(seed)
    ids = list(references)
    hypotheses = {}
    for k, image_id in enumerate(ids):
        refs = references[image_id]
        kind = k % 7
        if kind == 0:  # exact copy of one reference (raw, with its punctuation and capitals)
            hyp = refs[0]
        elif kind == 1:  # same words, shuffled
            words = refs[1].split()
            rng.shuffle(words)
            hyp = " ".join(words)
        elif kind == 2:  # truncated
            hyp = " ".join(refs[2].split()[: rng.randint(1, 4)])
        elif kind == 3:  # empty
            hyp = ""
        elif kind == 4:  # longer, with repeated words
            hyp = f"{refs[3]} {refs[3]} a a a"
        elif kind == 5:  # a caption of another image
            hyp = references[ids[(k + 17) % len(ids)]][0]
        else:  # a mix of two references
            first, second = refs[0].split(), refs[4].split()
            hyp = " ".join(first[: len(first) // 2] + second[len(second) // 2:])
        hypotheses[image_id] = hyp
    return hypotheses


def _coco_inputs(references, hypotheses):
    """The same tokens our scorers use, in pycocoevalcap's {id: [space-joined tokens]} layout."""
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in references.items()}
    res = {i: [" ".join(tokenize(hypotheses[i]))] for i in references}
    return gts, res


@pytest.fixture(scope="module")
def agreement_case(flickr8k_test_references):
    references = dict(list(flickr8k_test_references.items())[:400])
    hypotheses = _varied_hypotheses(references)
    return references, hypotheses, compute_scores(references, hypotheses)


@pytest.mark.slow
@pytest.mark.shared_data
def test_bleu_agrees_with_pycocoevalcap(agreement_case):
    coco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    references, hypotheses, ours = agreement_case
    corpus, per_image = coco_bleu.Bleu(4).compute_score(*_coco_inputs(references, hypotheses), verbose=0)
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"] == pytest.approx(corpus[k], abs=TOLERANCE)
        for row, image_id in enumerate(references):
            assert ours["per_image"][image_id][f"BLEU-{k + 1}"] == pytest.approx(per_image[k][row], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.shared_data
def test_cider_agrees_with_pycocoevalcap(agreement_case):
    coco_cider = pytest.importorskip("pycocoevalcap.cider.cider")
    references, hypotheses, ours = agreement_case
    corpus, per_image = coco_cider.Cider().compute_score(*_coco_inputs(references, hypotheses))
    assert ours["CIDEr-D"] == pytest.approx(float(corpus), abs=TOLERANCE)
    for row, image_id in enumerate(references):
        assert ours["per_image"][image_id]["CIDEr-D"] == pytest.approx(per_image[row], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.shared_data
def test_rouge_agrees_with_pycocoevalcap(agreement_case):
    coco_rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    references, hypotheses, ours = agreement_case
    corpus, per_image = coco_rouge.Rouge().compute_score(*_coco_inputs(references, hypotheses))
    assert ours["ROUGE-L"] == pytest.approx(float(corpus), abs=TOLERANCE)
    for row, image_id in enumerate(references):
        assert ours["per_image"][image_id]["ROUGE-L"] == pytest.approx(per_image[row], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("size", [1, 2, 7])
def test_small_sets_agree_with_pycocoevalcap(flickr8k_test_references, size):
    """Tiny sets exercise the df/idf edge (one image: idf 0) and BLEU on a handful of sentences."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu as CocoBleu
    from pycocoevalcap.cider.cider import Cider as CocoCider
    from pycocoevalcap.rouge.rouge import Rouge as CocoRouge

    references = dict(list(flickr8k_test_references.items())[100:100 + size])
    hypotheses = _varied_hypotheses(references, seed=size)
    hypotheses[next(iter(references))] = "A dog runs through the grass."  # never empty for size 1
    gts, res = _coco_inputs(references, hypotheses)
    ours = compute_scores(references, hypotheses)
    bleu, _ = CocoBleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(bleu, abs=TOLERANCE)
    assert ours["CIDEr-D"] == pytest.approx(float(CocoCider().compute_score(gts, res)[0]), abs=TOLERANCE)
    assert ours["ROUGE-L"] == pytest.approx(float(CocoRouge().compute_score(gts, res)[0]), abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.shared_data
def test_perfect_copy_beats_other_images_caption(flickr8k_test_references):
    references = dict(list(flickr8k_test_references.items())[:200])
    ids = list(references)
    # Leave out the copied reference so the copy is not trivially in the reference set.
    held_out = {i: refs[1:] for i, refs in references.items()}
    good = compute_scores(held_out, {i: references[i][0] for i in ids})
    bad = compute_scores(held_out, {i: references[ids[(k + 1) % len(ids)]][0] for k, i in enumerate(ids)})
    assert all(good[name] > bad[name] for name in METRIC_NAMES)
