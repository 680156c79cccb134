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


def test_table_marks_missing_metrics(bench):
    table = bench.format_rows({"ours": {m: 10.0 for m in bench.METRIC_NAMES}, "paper": {"BLEU-1": 63.0}})
    paper_line = table.splitlines()[2]
    assert "63.0" in paper_line and paper_line.count("-") == len(bench.METRIC_NAMES) - 1


@pytest.mark.slow
@pytest.mark.shared_data
def test_bench_quality_prints_every_row(bench, tiny_run, capsys):
    checkpoint = str(tiny_run["checkpoint"])
    rows = bench.main([checkpoint, checkpoint, "--data", str(tiny_run["data"]), "--images", str(tiny_run["images"]),
                       "--features", str(tiny_run["features"]), "--split", "val", "--beam-sizes", "1,3",
                       "--ensemble", "--rerank"])
    names = list(rows)
    assert names[0] == "nearest neighbour (train)" and names[1] == "image-blind LM (beam 3)"
    assert sum(name.endswith(" greedy") for name in names) == 2 and "ensemble of 2 (beam 3)" in names
    assert sum(name.endswith("beam 20 + re-ranking") for name in names) == 2
    assert sum(name.endswith("[paper]") for name in names) == 4
    assert all(0 <= value <= 1000 for scores in rows.values() for value in scores.values())
    printed = capsys.readouterr().out
    assert "Flickr8k val (12 images)" in printed and "Hard attention" in printed
