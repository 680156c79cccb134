"""Consensus re-ranking: the caption memory (build, save, load, checks), the choice it makes, and the doors
(`captioner memory`, `evaluate --memory`, `caption --memory`, the API)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT

from captioner.api import Captioner
from captioner.apps.cli import main
from captioner.checkpoint import atomic_save, load_checkpoint
from captioner.config import DecodeConfig, RerankConfig
from captioner.data.records import CaptionRecord
from captioner.decoding import Caption
from captioner.decoding.memory import CaptionMemory, CaptionMemoryError
from captioner.decoding.rerank import ConsensusReranker, rerank
from captioner.metrics import CiderDReward
from captioner.text import tokenize

ENCODER = {"encoder": "efficientnet_lite0", "weights_hash": "abc"}
SCENES = ["a dog runs on the grass", "a man rides a red bike", "two children swim in a pool",
          "a cat sleeps on a sofa"]


def _memory() -> CaptionMemory:
    """12 images: three per scene, features near the scene's axis, captions about the scene."""
    generator = torch.Generator().manual_seed(0)
    records, rows = [], []
    for s, scene in enumerate(SCENES):
        for copy in range(3):
            captions = [scene, f"{scene} today", f"there is {scene}"]
            records.append(CaptionRecord(f"train{s}-{copy}.jpg", "/nowhere", captions, "train"))
            rows.append(torch.nn.functional.one_hot(torch.tensor(s), 8).float() + 0.1 * torch.randn(8, generator=generator))
    return CaptionMemory.build(records, torch.stack(rows), ENCODER)


def _caption(text: str, score: float) -> Caption:
    return Caption(text, log_prob=score * 5, score=score, finished=True)


def test_memory_round_trips_through_a_file(tmp_path):
    memory = _memory()
    path = memory.save(tmp_path / "memory.safetensors")
    loaded = CaptionMemory.load(path)
    assert loaded.image_ids == memory.image_ids and loaded.captions == memory.captions
    assert loaded.encoder == ENCODER
    assert torch.allclose(loaded.features, memory.features, atol=1e-3)
    assert torch.allclose(loaded.features.norm(dim=1), torch.ones(len(loaded)), atol=1e-3)


def test_neighbours_are_the_most_similar_images():
    memory = _memory()
    query = torch.nn.functional.one_hot(torch.tensor([2, 0]), 8).float() * 7  # length does not matter
    nearest = memory.neighbours(query, 3).tolist()
    assert [{memory.image_ids[i][:6] for i in row} for row in nearest] == [{"train2"}, {"train0"}]
    assert memory.neighbours(query, 100).shape == (2, len(memory))  # k is capped at the memory's size
    with pytest.raises(CaptionMemoryError, match="8-dim features"):
        memory.neighbours(torch.ones(2, 5), 3)


def test_consensus_is_ciderd_against_the_neighbours_references_pooled():
    memory = _memory()
    scorer = CiderDReward([[tokenize(t) for t in texts] for texts in memory.captions])
    candidates = [tokenize("a dog runs on the grass"), tokenize("a man rides a bike")]
    neighbours = [0, 1, 5]
    pooled = [tokenize(t) for j in neighbours for t in memory.captions[j]]
    assert memory.consensus(candidates, neighbours) == pytest.approx(scorer.score(candidates, [pooled, pooled]))
    # every memory image has three captions here, so that is also the mean over the neighbours
    expected = [np.mean([scorer.score([c], [[tokenize(t) for t in memory.captions[j]]])[0] for j in neighbours])
                for c in candidates]
    assert memory.consensus(candidates, neighbours) == pytest.approx(expected)


def test_pooled_reward_equals_scoring_against_the_joined_reference_lists():
    corpus = [[tokenize("a dog runs"), tokenize("a brown dog runs fast")], [tokenize("a cat sleeps")],
              [tokenize("two dogs play in the snow"), tokenize("dogs in snow"), tokenize("a dog in the snow")]]
    scorer = CiderDReward(corpus)
    hypotheses = [tokenize("a dog runs in the snow"), tokenize("a cat"), []]
    for images in ([0], [2, 0], [1, 2, 0, 2]):
        joined = [ref for i in images for ref in corpus[i]]
        assert scorer.score_pooled(hypotheses, images) == pytest.approx(scorer.score(hypotheses, [joined] * 3))
    with pytest.raises(ValueError, match="at least one"):
        scorer.score_pooled(hypotheses, [])


def test_rerank_prefers_the_candidate_the_neighbours_agree_with():
    memory = _memory()
    features = torch.nn.functional.one_hot(torch.tensor([1]), 8).float()  # the bike scene
    nbest = [[_caption("a dog runs on the grass", -0.5), _caption("a man rides a red bike", -0.9),
              _caption("a cat sleeps", -1.2)]]
    chosen = rerank(memory, features, nbest, RerankConfig(neighbours=3, candidates=3), n_best=2)
    assert [c.text for c in chosen[0]] == ["a man rides a red bike", "a dog runs on the grass"]
    assert chosen[0][0].consensus > chosen[0][1].consensus >= 0
    # A large weight on the beam score gives the beam's order back.
    kept = rerank(memory, features, nbest, RerankConfig(neighbours=3, candidates=3, model_weight=1e6), n_best=3)
    assert [c.text for c in kept[0]] == [c.text for c in nbest[0]]


def test_rerank_config_checks():
    config = RerankConfig(candidates=8)
    assert config.decode_config(DecodeConfig(length_penalty=0.7)) == DecodeConfig(beam_size=8, n_best=8,
                                                                                   length_penalty=0.7)
    with pytest.raises(ValueError, match="beam-search candidates"):
        config.decode_config(DecodeConfig(strategy="greedy"))
    with pytest.raises(ValueError, match="n_best"):
        config.decode_config(DecodeConfig(n_best=9, beam_size=9))
    with pytest.raises(ValueError, match="at least 1"):
        RerankConfig(neighbours=0)


def test_memory_refuses_another_cnn_an_overlapping_split_and_bad_files(tmp_path):
    memory = _memory()
    memory.check_encoder(dict(ENCODER), "model.safetensors")
    with pytest.raises(CaptionMemoryError, match="captioner memory --checkpoint"):
        memory.check_encoder({**ENCODER, "weights_hash": "other"}, "model.safetensors")
    memory.check_disjoint(["test1.jpg"], "test")
    with pytest.raises(CaptionMemoryError, match="1 images of the test split"):
        memory.check_disjoint(["test1.jpg", "train3-1.jpg"], "test")
    with pytest.raises(FileNotFoundError, match="captioner memory"):
        CaptionMemory.load(tmp_path / "missing.safetensors")
    atomic_save({"x": torch.zeros(2)}, {"format": "something-else"}, tmp_path / "other.safetensors")
    with pytest.raises(CaptionMemoryError, match="not a caption memory"):
        CaptionMemory.load(tmp_path / "other.safetensors")
    with pytest.raises(CaptionMemoryError, match="no captions"):
        CaptionMemory(["a.jpg"], torch.ones(1, 4), [[]], ENCODER)


# ------------------------------------------------------------------------------------ the doors

@pytest.fixture(scope="module")
def tiny_memory(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "train-memory.safetensors"
    data = ["--data", str(tiny_run["data"]), "--images", str(tiny_run["images"])]
    assert main(["memory", *data, "--checkpoint", str(tiny_run["checkpoint"]), "--features",
                 str(tiny_run["features"]), "--out", str(path)]) == 0
    return path


@pytest.mark.slow
def test_memory_command_remembers_the_train_split(tiny_memory, tiny_run):
    from captioner.data import load_dataset

    memory = CaptionMemory.load(tiny_memory)
    train = load_dataset(tiny_run["data"], images_dir=tiny_run["images"]).split("train")
    assert memory.image_ids == [r.image_id for r in train]
    assert memory.captions == [r.captions for r in train]
    assert memory.encoder["weights_hash"] == load_checkpoint(tiny_run["checkpoint"]).encoder["weights_hash"]


@pytest.mark.slow
def test_evaluate_with_a_memory_reranks_and_refuses_one_of_the_scored_split(tiny_memory, tiny_run, tmp_path, capsys):
    data = ["--data", str(tiny_run["data"]), "--images", str(tiny_run["images"])]
    common = ["evaluate", "--checkpoint", str(tiny_run["checkpoint"]), *data, "--split", "test",
              "--features", str(tiny_run["features"]), "--no-html"]
    assert main([*common, "--memory", str(tiny_memory), "--rerank-candidates", "4", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["rerank"] == {"neighbours": 20, "candidates": 4, "model_weight": 0.0, "memory_images": 60}
    assert "beam 4 + consensus re-ranking" in capsys.readouterr().out
    assert main([*common, "--memory", "train", "--rerank-candidates", "4", "--out", str(tmp_path / "b")]) == 0
    assert (json.loads((tmp_path / "b" / "predictions.json").read_text())
            == json.loads((tmp_path / "a" / "predictions.json").read_text()))
    # A memory of the test split itself would choose captions with the test references: refused.
    test_memory = tmp_path / "test-memory.safetensors"
    assert main(["memory", *data, "--checkpoint", str(tiny_run["checkpoint"]), "--split", "test",
                 "--features", str(tiny_run["features"]), "--out", str(test_memory)]) == 0
    capsys.readouterr()
    assert main([*common, "--memory", str(test_memory)]) == 2
    assert "images of the test split" in capsys.readouterr().err
    assert main([*common, "--memory", str(tiny_memory), "--strategy", "greedy"]) == 2
    assert "--memory re-ranks beam-search candidates" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_command_and_api_with_a_memory(tiny_memory, tiny_run, tmp_path):
    examples = REPO_ROOT / "demo" / "examples"
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(examples), "--checkpoint", str(tiny_run["checkpoint"]), "--memory",
                 str(tiny_memory), "--rerank-candidates", "4", "--n-best", "2", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(list(examples.glob("*.jpg"))) and all(row["caption"] for row in rows)
    assert all(len(row["captions"]) == 2 and "consensus" in row["captions"][0] for row in rows)
    captioner = Captioner.from_pretrained(tiny_run["checkpoint"], device="cpu", memory=tiny_memory,
                                          rerank=RerankConfig(candidates=4))
    assert isinstance(captioner.reranker, ConsensusReranker)
    result = captioner.caption(sorted(examples.glob("*.jpg"))[0], n_best=2)[0]
    assert len(result.captions) == 2 and result.captions[0].consensus is not None
    assert result.captions[0].consensus >= result.captions[1].consensus
    greedy = captioner.caption(sorted(examples.glob("*.jpg"))[0], strategy="greedy")[0]
    assert greedy.captions[0].consensus is None  # other strategies are not re-ranked
    other = tmp_path / "other.safetensors"
    memory = CaptionMemory.load(tiny_memory)
    memory.encoder = {**memory.encoder, "weights_hash": "0000"}
    memory.save(other)
    with pytest.raises(CaptionMemoryError, match="built with"):
        Captioner.from_pretrained(tiny_run["checkpoint"], device="cpu", memory=other)


@pytest.mark.slow
def test_demo_says_when_it_re_ranks(tiny_memory, tiny_run):
    from captioner.apps.demo import predict

    example = sorted((REPO_ROOT / "demo" / "examples").glob("*.jpg"))[0]
    captioner = Captioner.from_pretrained(tiny_run["checkpoint"], device="cpu", memory=tiny_memory,
                                          rerank=RerankConfig(candidates=4, neighbours=5))
    markdown, rows = predict(captioner, example, "beam", 3, 1.0, 0, 2)
    markdown = markdown.replace("\\", "")  # Markdown escapes
    assert "4 candidates re-ranked by agreement with the captions of the 5 most similar of 60 training photos" in markdown
    assert "consensus CIDEr-D" in markdown and len(rows) == 2
    markdown, _ = predict(captioner, example, "greedy", 3, 1.0, 0, 1)
    assert "greedy decoding" in markdown and "consensus" not in markdown
