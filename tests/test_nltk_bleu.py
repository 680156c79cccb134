"""nltk's corpus_bleu beside the headline BLEU: same numbers as nltk called directly, and in `evaluate`."""

import importlib.util
import json

import pytest
from conftest import REPO_ROOT
from nltk.translate.bleu_score import corpus_bleu

from captioner.apps.cli import main
from captioner.metrics import METRIC_NAMES
from captioner.metrics.nltk_bleu import NLTK_BLEU_LABEL, nltk_corpus_bleu, tutorial_tokens

REFERENCES = {
    "dog.jpg": ["A black dog runs across the grass .", "A dog's running on a lawn.", "The dog is running !"],
    "girl.jpg": ["A little girl climbs the stairs .", "A girl in pink climbing up stairs", "child on steps"],
    7: ["Two men play football on a field .", "Men playing soccer outside ."],
}
HYPOTHESES = {"dog.jpg": "a black dog runs across the green grass", "girl.jpg": "A girl climbing stairs.",
              7: "two men play"}  # 3 words: no 4-grams at all


def test_tutorial_tokens_lowercase_and_drop_punctuation():
    assert tutorial_tokens("A dog's ball, in the PARK .") == ["a", "dogs", "ball", "in", "the", "park"]
    assert tutorial_tokens("  ... ") == []


def test_matches_nltk_called_directly_on_hand_tokenised_captions():
    # written out by hand, so the tokenisation is checked as well as the call
    references = [[["a", "black", "dog", "runs", "across", "the", "grass"], ["a", "dogs", "running", "on", "a", "lawn"],
                   ["the", "dog", "is", "running"]],
                  [["a", "little", "girl", "climbs", "the", "stairs"], ["a", "girl", "in", "pink", "climbing", "up",
                                                                         "stairs"], ["child", "on", "steps"]],
                  [["two", "men", "play", "football", "on", "a", "field"], ["men", "playing", "soccer", "outside"]]]
    hypotheses = [["a", "black", "dog", "runs", "across", "the", "green", "grass"], ["a", "girl", "climbing", "stairs"],
                  ["two", "men", "play"]]
    expected = {"BLEU-1": corpus_bleu(references, hypotheses, weights=(1.0, 0, 0, 0)),
                "BLEU-2": corpus_bleu(references, hypotheses, weights=(0.5, 0.5, 0, 0)),
                "BLEU-3": corpus_bleu(references, hypotheses, weights=(1 / 3, 1 / 3, 1 / 3, 0)),
                "BLEU-4": corpus_bleu(references, hypotheses)}
    scores = nltk_corpus_bleu(REFERENCES, HYPOTHESES)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert 0 < scores["BLEU-4"] < scores["BLEU-3"] < scores["BLEU-2"] < scores["BLEU-1"] < 1


def test_differs_from_the_headline_bleu_where_tokenisation_does():
    from captioner.metrics import Bleu

    # coco-caption keeps "dog's" whole; the tutorials' cleaning makes it "dogs"
    references, hypotheses = {1: ["the dog's ball is red"]}, {1: "the dogs ball is red"}
    assert nltk_corpus_bleu(references, hypotheses)["BLEU-4"] == pytest.approx(1.0)
    coco, _ = Bleu(4).compute_score(references, hypotheses)
    assert coco[0] == pytest.approx(0.8)


def test_refuses_mismatched_images():
    with pytest.raises(ValueError, match="same images"):
        nltk_corpus_bleu({1: ["a dog"]}, {2: "a dog"})
    with pytest.raises(ValueError, match="without references"):
        nltk_corpus_bleu({1: []}, {1: "a dog"})


@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_reports_it_beside_the_headline(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
                 "--images", str(tiny_run["images"]), "--split", "test", "--features", str(tiny_run["features"]),
                 "--out", str(out), "--strategy", "greedy"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(NLTK_BLEU_LABEL))
    report = json.loads((out / "report.json").read_text())
    nltk_bleu = report["nltk_bleu"]
    assert nltk_bleu["label"] == NLTK_BLEU_LABEL and nltk_bleu["smoothing"] == "none"
    assert set(report["scores"]) >= set(nltk_bleu["scores"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    # the table row shows the report's values ×100, and "-" for the metrics nltk does not compute
    others = len(METRIC_NAMES) - 4
    assert row.split()[-4 - others:] == ([f"{nltk_bleu['scores'][f'BLEU-{n}'] * 100:.1f}" for n in range(1, 5)]
                                         + ["-"] * others)
    predictions = {p["image_id"]: p["caption"] for p in json.loads((out / "predictions.json").read_text())}
    assert len(predictions) == report["images"]
    assert NLTK_BLEU_LABEL in (out / "report.html").read_text()

    # scripts/compare_bleu.py reads the same predictions back and prints the same two rows
    spec = importlib.util.spec_from_file_location("compare_bleu", REPO_ROOT / "scripts" / "compare_bleu.py")
    compare_bleu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_bleu)
    assert compare_bleu.main([str(out / "predictions.json"), "--data", str(tiny_run["data"]), "--images",
                             str(tiny_run["images"]), "--split", "test"]) == 0
    rows = {line.split("  ")[1].strip()[3:]: line.split()[-4:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[NLTK_BLEU_LABEL] == [f"{nltk_bleu['scores'][f'BLEU-{n}'] * 100:.2f}" for n in range(1, 5)]
    assert rows["coco-caption (captioner.metrics, headline)"] == [f"{report['scores'][f'BLEU-{n}'] * 100:.2f}"
                                                                  for n in range(1, 5)]
