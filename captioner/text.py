"""Tokenisation and the vocabulary.

`tokenize` applies the normalisation coco-caption's PTB step applies before scoring: lowercase, words
and numbers kept, punctuation dropped. No nltk data is needed, so it works offline.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

# Runs of letters/digits, with an optional 's-style suffix kept on the word ("man's" -> "man's").
TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


def tokenize(text: str) -> list[str]:
    """Lowercase `text` and split it into word/number tokens, dropping punctuation."""
    return TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Word <-> id mapping with distinct ids for padding, start, end and unknown words."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[: len(SPECIALS)] != list(SPECIALS):
            raise ValueError(f"vocabulary must start with the special tokens {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            duplicates = sorted(w for w, n in Counter(words).items() if n > 1)
            raise ValueError(f"vocabulary has duplicate words: {duplicates[:10]}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = range(len(SPECIALS))

    @classmethod
    def build(cls, tokenized_captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Keep words seen at least `min_count` times. Pass the *train* captions only."""
        counts = Counter(token for caption in tokenized_captions for token in caption)
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def encode(self, tokens: Sequence[str], add_specials: bool = True) -> list[int]:
        """Token strings -> ids; `<start>` ... `<end>` around them when `add_specials`."""
        ids = [self.index.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_specials else ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at `<end>` and leaving out `<start>` and `<pad>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.words[i])
        return words

    def to_json(self) -> dict:
        return {"words": self.words}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError('vocabulary JSON must be an object with a "words" list')
        if not all(isinstance(w, str) for w in data["words"]):
            raise ValueError("vocabulary JSON: every entry of \"words\" must be a string")
        return cls(data["words"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(json.loads(Path(path).read_text()))
