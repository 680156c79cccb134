"""`captioner evaluate` end to end on a checkpoint trained inside the tests."""

import json

import pytest

from captioner.apps.cli import main
from captioner.evaluation.evaluate import format_table
from captioner.metrics import METRIC_NAMES

pytestmark = pytest.mark.shared_data


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
def test_evaluate_writes_report_predictions_and_html(tiny_run, tmp_path, capsys, use_cache):
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
            "--images", str(tiny_run["images"]), "--split", "test", "--out", str(out), "--beam-size", "2"]
    if use_cache:
        args += ["--features", str(tiny_run["features"])]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CIDEr-D" in printed and "BLEU-4" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 12 and report["split"] == "test"
    assert set(report["scores"]) == set(METRIC_NAMES)
    assert report["decoding"]["beam_size"] == 2 and report["checkpoint_sha256"]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 12
    assert all(isinstance(p["image_id"], int) and p["caption"] for p in predictions)
    html = (out / "report.html").read_text()
    assert "data:image/jpeg;base64" in html and predictions[0]["caption"].split()[0] in html


@pytest.mark.slow
def test_cached_and_computed_features_give_the_same_scores(tiny_run, tmp_path):
    reports = []
    for name, extra in (("cached", ["--features", str(tiny_run["features"])]), ("computed", [])):
        out = tmp_path / name
        assert main(["evaluate", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
                     "--images", str(tiny_run["images"]), "--split", "val", "--out", str(out),
                     "--strategy", "greedy", "--no-html", *extra]) == 0
        reports.append(json.loads((out / "predictions.json").read_text()))
    assert reports[0] == reports[1]


def test_format_table_scales_by_100():
    table = format_table({"beam 3": {m: 0.5 for m in METRIC_NAMES}})
    assert table.splitlines()[1].split()[-1] == "50.0"


@pytest.mark.slow
def test_info_prints_checkpoint_settings(tiny_run, capsys):
    assert main(["info", str(tiny_run["run"])]) == 0  # the run folder: its best
    summary = capsys.readouterr().out
    assert summary.startswith(f"{tiny_run['checkpoint']}\n") and "  CNN       efficientnet_lite0" in summary
    assert main(["info", str(tiny_run["checkpoint"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["info"]["epoch"] >= 1 and info["encoder"]["encoder"] == "efficientnet_lite0"


@pytest.mark.slow
def test_evaluate_missing_checkpoint_is_a_usage_error(tiny_run, capsys):
    assert main(["evaluate", "--checkpoint", "/nonexistent.safetensors", "--data", str(tiny_run["data"]),
                 "--images", str(tiny_run["images"])]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_evaluate_asks_coco_dev_for_a_split_it_lacks(coco_dev_dir, capsys):
    """coco-dev's captions.json names no split, so it is all test; asking for val says so, before any model
    is loaded (the checkpoint path does not exist)."""
    assert main(["evaluate", "--checkpoint", "/nonexistent.safetensors", "--data", str(coco_dev_dir),
                 "--split", "val"]) == 2
    error = capsys.readouterr().err
    for fragment in ("no 'val' images", "it has test (100 images)", "captions.json naming no split",
                     "use --split test"):
        assert fragment in error, (fragment, error)


@pytest.mark.slow
def test_evaluate_reads_coco_dev_as_it_is(coco_dev_dir, toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "coco-dev"
    assert main(["evaluate", "--checkpoint", str(toy_checkpoint), "--data", str(coco_dev_dir / "captions.json"),
                 "--out", str(out), "--strategy", "greedy", "--no-html"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["images"] == 100 and not report["skipped_images"]
    assert 0 <= report["scores"]["Obj-F1"] <= 1 and "Obj-F1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
def test_evaluate_reports_with_and_without_concepts(tiny_run, tmp_path, capsys, use_cache):
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(tiny_run["checkpoint"]), "--data", str(tiny_run["data"]),
            "--images", str(tiny_run["images"]), "--split", "test", "--out", str(out), "--no-html",
            "--concept-threshold", "0.2"]
    if use_cache:  # the classifier still runs, on the cached features
        args += ["--features", str(tiny_run["features"])]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "beam 3, concepts p>=0.2" in printed and "beam 3, concepts off" in printed
    report = json.loads((out / "report.json").read_text())
    concepts = report["concepts"]
    assert concepts["used"] and concepts["threshold"] == 0.2 and report["decoding"]["concept_threshold"] == 0.2
    assert set(concepts["scores_concepts_off"]) == set(METRIC_NAMES)
    # Flickr8k test photos: the CNN recognises dogs and more, and the tiny model's vocabulary says "dog"
    assert concepts["images_with_concepts"] > 0 and concepts["images_constrained"] > 0
    assert 0 <= concepts["constraints_met"] <= concepts["images_constrained"]

    off = tmp_path / "off"
    assert main([*args[:args.index("--out")], "--out", str(off), "--no-html", "--concepts", "off",
                 *(["--features", str(tiny_run["features"])] if use_cache else [])]) == 0
    printed = capsys.readouterr().out
    assert "concepts off" not in printed
    off_report = json.loads((off / "report.json").read_text())
    assert off_report["concepts"]["used"] is False and off_report["decoding"]["concept_threshold"] is None
    # the "concepts off" row of the first report is exactly this plain evaluation
    assert off_report["scores"] == concepts["scores_concepts_off"]


def test_concepts_are_off_when_the_checkpoints_cnn_cannot_be_built():
    from types import SimpleNamespace

    import torch

    from captioner.evaluation.evaluate import checkpoint_concept_logits

    checkpoint = SimpleNamespace(encoder={"encoder": "no-such-cnn"}, encoder_state=None, path="ck.safetensors")
    logits, why = checkpoint_concept_logits(checkpoint, torch.zeros(2, 8))
    assert logits is None and "no-such-cnn" in why


def test_the_concepts_off_row_decodes_only_the_constrained_images_again():
    from captioner.concepts import Concept
    from captioner.config import DecodeConfig
    from captioner.data.records import CaptionRecord
    from captioner.decoding import Caption
    from captioner.evaluation.evaluate import concepts_section

    records = [CaptionRecord(f"{i}.jpg", None, ["a dog runs on the grass", "a cat sits"], "test") for i in range(4)]
    dog = [Concept("dog", 0.9)]
    captions = [[Caption("a dog runs", -1.0, -1.0, True, concepts=dog, constraints_met=True)],
                [Caption("a cat sits", -1.0, -1.0, True)],  # no concept: not constrained
                [Caption("a dog sits", -1.0, -1.0, True, concepts=dog, constraints_met=False)],
                [Caption("a cat runs", -1.0, -1.0, True, concepts=dog)]]  # greedy: reported, not constrained
    decoded = []

    def without_concepts(rows):
        decoded.append(rows)
        return [[Caption("a dog runs on the grass", -1.0, -1.0, True)] for _ in rows]

    section = concepts_section(DecodeConfig(), records, captions, {}, without_concepts)
    assert decoded == [[0, 2]]
    assert (section["images_with_concepts"], section["images_constrained"], section["constraints_met"]) == (3, 2, 1)
    assert set(section["scores_concepts_off"]) == set(METRIC_NAMES)
    corpus = {m: 0.5 for m in METRIC_NAMES}
    unconstrained = [captions[1], captions[3]]
    assert concepts_section(DecodeConfig(), records[:2], unconstrained, corpus, without_concepts)[
        "scores_concepts_off"] == corpus and decoded == [[0, 2]]  # nothing constrained: nothing decoded again
