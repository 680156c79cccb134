"""scripts/bench/quality.py: the baselines it prints and its table, on the tiny Flickr8k run."""

import pytest
import torch
from helpers import load_script

from captioner.data.records import CaptionRecord


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/quality.py")


def test_nearest_neighbour_takes_the_most_similar_training_image(bench):
    train = [CaptionRecord(f"t{i}.jpg", None, [f"caption {i} first", f"caption {i} second"], "train")
             for i in range(3)]
    train_features = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    test_features = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0, 0.1]])  # cosine: scale does not matter
    assert bench.nearest_neighbour(train, train_features, test_features) == ["caption 1 first", "caption 0 first"]


def test_nearest_neighbour_can_choose_the_caption(bench):
    train = [CaptionRecord(f"t{i}.jpg", None, [f"caption {i} first", f"caption {i} second"], "train")
             for i in range(2)]
    chosen = bench.nearest_neighbour(train, torch.eye(2), torch.tensor([[0.0, 1.0]]),
                                     choose=lambda record: record.captions[-1])
    assert chosen == ["caption 1 second"]


def test_consensus_caption_agrees_most_with_the_others(bench):
    captions = ["a dog runs on the grass", "a brown dog runs on the green grass", "a dog runs on grass",
                "a cat sleeps on a sofa"]
    corpus = [[c.split() for c in captions], ["a man rides a bike".split(), "two kids play".split()]]
    cider = bench.CiderD(corpus)
    chosen = bench.consensus_caption(captions, cider)
    others = [c for c in captions if c != chosen]
    assert chosen != "a cat sleeps on a sofa"
    # brute force: its CIDEr-D against the others is the highest
    scores = {c: float(cider.score([c.split()], [[o.split() for o in captions if o != c]])[0]) for c in captions}
    assert scores[chosen] == max(scores.values()) and len(others) == 3
    assert bench.consensus_caption(["only one"], cider) == "only one"


def test_central_caption_is_the_most_typical_one(bench):
    captions = ["a cat sleeps", "a dog runs on the grass", "a black dog runs on the grass",
                "the dog runs on grass", "two men play chess", "a dog runs on the grass"]
    assert bench.central_caption(captions) == "a dog runs on the grass"  # the first of the two copies
    assert bench.central_caption(["x y", "z"]) == "x y"  # nothing shared: the first
    with pytest.raises(ValueError):
        bench.central_caption([])


def test_coco_dev_row_scores_objects(bench):
    records = [CaptionRecord("a.jpg", None, ["a zebra in a field", "two zebras grazing", "zebras on grass"], "test"),
               CaptionRecord("b.jpg", None, ["a cat on a sofa", "a cat sleeping on a couch", "a kitten"], "test")]
    row = bench.coco_dev_row(records, ["a man in a field", "a cat on a couch"])
    # zebra missed and a person said that no reference names; cat and couch right
    assert row["Obj-P"] == pytest.approx(200 / 3) and row["Obj-R"] == pytest.approx(200 / 3)
    assert row["Obj-F1"] == pytest.approx(200 / 3) and set(row) == set(bench.COCO_DEV_COLUMNS)


def test_concept_rows_only_when_decoding_has_concepts(bench, monkeypatch):
    import dataclasses

    @dataclasses.dataclass
    class WithConcepts:
        beam_size: int = 3
        concept_threshold: float | None = 0.25

    @dataclasses.dataclass
    class Without:
        beam_size: int = 3

    def decode_with(model, vocab, features, config, concept_logits=None):
        return []

    def decode_without(model, vocab, features, config):
        return []

    for config, decode, expected in [(WithConcepts, decode_with, 0.25), (WithConcepts, decode_without, None),
                                     (Without, decode_with, None)]:
        monkeypatch.setattr(bench, "DecodeConfig", config)
        monkeypatch.setattr(bench, "decode_features", decode)
        assert bench.concept_decoding() == expected


def test_table_marks_missing_metrics(bench):
    table = bench.format_rows({"ours": {m: 10.0 for m in bench.METRIC_NAMES}, "paper": {"BLEU-1": 63.0}})
    paper_line = table.splitlines()[2]
    assert "63.0" in paper_line and paper_line.count("-") == len(bench.METRIC_NAMES) - 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_bench_quality_prints_every_row(bench, tiny_run, coco_dev_dir, tmp_path, capsys):
    checkpoint = str(tiny_run["checkpoint"])
    tables = bench.main([checkpoint, checkpoint, "--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]),
                         "--features", str(tiny_run["features"]), "--split", "val", "--beam-sizes", "1,3",
                         "--ensemble", "--rerank", "--coco-dev", str(coco_dev_dir), "--cache", str(tmp_path)])
    coco = list(tables["coco-dev"])
    assert coco[:2] == ["nearest Flickr8k train photo", "one caption for all"]
    concept_rows = sum("concepts" in name for name in coco)
    assert len(coco) == 2 + 2 * (2 if bench.concept_decoding() is not None else 1) and concept_rows in (0, 4)
    assert all(0 <= value <= 1000 for scores in tables["coco-dev"].values() for value in scores.values())
    assert len(list(tmp_path.glob("coco-dev-100-*.safetensors"))) == 1  # one CNN, cached once
    rows = tables["flickr8k"]
    names = list(rows)
    assert names[0] == "nearest neighbour (train)" and names[1] == "image-blind LM (beam 3)"
    assert sum(name.endswith(" greedy, concepts off") for name in names) == 2 and "ensemble of 2 (beam 3)" in names
    assert sum(name.endswith(f"beam 3 + concepts (p >= {bench.concept_decoding()})") for name in names) == 2
    assert sum(name.endswith("beam 20 + re-ranking") for name in names) == 2
    assert sum(name.endswith("[paper]") for name in names) == 4
    assert all(0 <= value <= 1000 for scores in rows.values() for value in scores.values())
    printed = capsys.readouterr().out
    assert "Flickr8k val (12 images)" in printed and "Hard attention" in printed
    assert "coco-dev (100 COCO photos" in printed and "Obj-F1" in printed
