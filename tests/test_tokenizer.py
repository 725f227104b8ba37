"""BytePairTokenizer against a naive reference: recount every pair for each merge, and encode by
applying the merges in training order."""

from collections import Counter

import numpy as np
import pytest

from tfz.tokenizer import BytePairTokenizer, _words


def naive_train(data: bytes, vocab_size: int) -> list[tuple[int, int]]:
    words = [list(w) for w in _words(data)]
    merges = []
    while 256 + len(merges) < vocab_size:
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        pair, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        new = 256 + len(merges)
        merges.append(pair)
        for k, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[k] = out
    return merges


def naive_encode(data: bytes, merges) -> list[int]:
    out = []
    for w in _words(data):
        ids = list(w)
        for r, pair in enumerate(merges):
            j, merged = 0, []
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair:
                    merged.append(256 + r)
                    j += 2
                else:
                    merged.append(ids[j])
                    j += 1
            ids = merged
        out.extend(ids)
    return out


def _text(rng, n):
    alphabet = list(b"aab_ c1\n  (x).") + [0xC3, 0xA9]
    return bytes(rng.choice(alphabet, size=n).tolist())


@pytest.mark.parametrize("seed", range(6))
def test_training_and_encoding_match_the_naive_reference(seed):
    rng = np.random.default_rng(seed)
    data = _text(rng, 600)
    vocab = int(rng.integers(257, 320))
    tok = BytePairTokenizer.train(data, vocab)
    assert list(tok.merges) == naive_train(data, vocab)
    assert tok.vocab_size <= vocab
    other = _text(rng, 300)
    assert tok.encode(other).tolist() == naive_encode(other, tok.merges)
    assert tok.decode(tok.encode(other)) == other


def test_round_trip_of_real_text_and_arbitrary_bytes():
    src = open(__file__, "rb").read()
    tok = BytePairTokenizer.train(src, 400)
    assert tok.vocab_size == 400
    ids = tok.encode(src)
    assert ids.dtype == np.uint16 and len(ids) < len(src) / 2
    assert tok.decode(ids) == src
    junk = bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
    assert tok.decode(tok.encode(junk)) == junk


def test_training_stops_when_no_pair_repeats():
    tok = BytePairTokenizer.train(b"abab", 1000)
    assert tok.merges == ((97, 98),) and tok.encode(b"abab").tolist() == [256, 256]


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="vocab_size.*100"):
        BytePairTokenizer.train(b"abc", 100)
    with pytest.raises(ValueError, match="merge 0"):
        BytePairTokenizer([(97, 300)])
    with pytest.raises(ValueError, match="token id 257"):
        BytePairTokenizer([(97, 98)]).decode([97, 257])
    with pytest.raises(ValueError, match="token id -1"):
        BytePairTokenizer([]).decode([-1])
