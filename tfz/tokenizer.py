"""Byte-pair encoding learned from a corpus: a subword vocabulary that needs no download.

Text is first cut into words (runs of letters, of digits, of other non-space characters with an
optional leading space, and of white space); merges never cross a word. Ids 0-255 are the bytes, so
any text encodes and ``decode(encode(text)) == text``. Merge ``i`` makes id ``256 + i``. Training
merges the most frequent adjacent pair of the corpus's words, ties broken by the smaller pair, until
``vocab_size`` ids exist or no pair occurs twice; encoding a word applies the learned merges in the
order they were learned.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from tfz._validate import check_int

__all__ = ["BytePairTokenizer", "MAX_VOCAB"]

MAX_VOCAB = 1 << 16
"""Ids fit in uint16."""
_WORD = re.compile(rb"[A-Za-z_]+|[0-9]+| ?[^\sA-Za-z_0-9]+|\s+")


def _words(data: bytes) -> list[bytes]:
    return _WORD.findall(data)


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, j, a, b = [], 0, pair[0], pair[1]
    while j < len(ids):
        if j + 1 < len(ids) and ids[j] == a and ids[j + 1] == b:
            out.append(new)
            j += 2
        else:
            out.append(ids[j])
            j += 1
    return out


class BytePairTokenizer:
    """Byte ids 0-255 plus one id per learned merge (``256 + index``)."""

    def __init__(self, merges: Iterable[Sequence[int]]):
        merges = [tuple(int(v) for v in pair) for pair in merges]
        for i, pair in enumerate(merges):
            if len(pair) != 2 or not all(0 <= v < 256 + i for v in pair):
                raise ValueError(f"merge {i} is {pair!r}: needs two ids below {256 + i}")
        if 256 + len(merges) > MAX_VOCAB:
            raise ValueError(f"{len(merges)} merges exceed the largest vocabulary, {MAX_VOCAB}")
        self.merges: tuple[tuple[int, int], ...] = tuple(merges)
        self._rank = {pair: i for i, pair in enumerate(self.merges)}
        self._cache: dict[bytes, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    @classmethod
    def train(cls, data: bytes, vocab_size: int) -> BytePairTokenizer:
        """Learn up to ``vocab_size - 256`` merges from ``data`` (fewer when no pair occurs twice)."""
        check_int("vocab_size", vocab_size, 256, maximum=MAX_VOCAB)
        counts = Counter(_words(bytes(data)))
        words = [list(w) for w in counts]
        freq = list(counts.values())
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pairs[pair] += freq[i]
                where[pair].add(i)
        heap = [(-c, pair) for pair, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while 256 + len(merges) < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            count = pairs.get(pair, 0)
            if count != -neg:  # stale: its count fell since it was pushed
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                continue
            if count < 2:
                break
            new = 256 + len(merges)
            merges.append(pair)
            touched = set()
            for i in where.pop(pair):
                old = words[i]
                for p in zip(old, old[1:]):
                    pairs[p] -= freq[i]
                words[i] = _merge(old, pair, new)
                for p in zip(words[i], words[i][1:]):
                    pairs[p] += freq[i]
                    where[p].add(i)
                    touched.add(p)
            del pairs[pair]
            for p in touched:
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
        return cls(merges)

    def _encode_word(self, word: bytes) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids, rank = list(word), self._rank
            while len(ids) > 1:
                best = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, MAX_VOCAB))
                if best not in rank:
                    break
                ids = _merge(ids, best, 256 + rank[best])
            self._cache[word] = ids
        return ids

    def encode(self, data: bytes) -> np.ndarray:
        """Token ids of ``data`` (uint16 [tokens])."""
        out: list[int] = []
        for word in _words(bytes(data)):
            out.extend(self._encode_word(word))
        return np.asarray(out, dtype=np.uint16)

    def decode(self, ids: Iterable[int]) -> bytes:
        """The bytes of token ids (ValueError naming an id outside the vocabulary)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        table = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            table.append(table[a] + table[b])
        return b"".join(table[i] for i in ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, BytePairTokenizer) and self.merges == other.merges

    def __hash__(self) -> int:
        return hash(self.merges)

    def __repr__(self) -> str:
        return f"BytePairTokenizer(vocab_size={self.vocab_size})"
