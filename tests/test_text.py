import pytest

from captioner.text import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A child, in a PINK dress; is climbing up 2 stairs .") == [
        "a", "child", "in", "a", "pink", "dress", "is", "climbing", "up", "2", "stairs"]
    assert tokenize("The dog's ball!") == ["the", "dog's", "ball"]
    assert tokenize("  ...  ") == []


def test_vocabulary_min_count_and_specials_are_distinct():
    vocab = Vocabulary.build([["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]], min_count=2)
    assert vocab.words[:4] == list(SPECIALS)
    assert len({vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id}) == 4
    assert "a" in vocab and "dog" in vocab and "cat" not in vocab
    assert vocab.encode(["a", "cat"]) == [vocab.start_id, vocab.index["a"], vocab.unk_id, vocab.end_id]


def test_decode_stops_at_end_and_skips_start_and_pad():
    vocab = Vocabulary.build([["a", "dog"]], min_count=1)
    ids = vocab.encode(["a", "dog"]) + [vocab.pad_id, vocab.index["a"]]
    assert vocab.decode(ids) == ["a", "dog"]


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build([["ein", "hund"], ["ein", "café"]], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words


def test_bad_vocabulary_json_is_refused():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary.from_json({"words": ["a", "b"]})
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary.from_json({"words": [*SPECIALS, "a", "a"]})
    with pytest.raises(ValueError, match="words"):
        Vocabulary.from_json(["a"])
