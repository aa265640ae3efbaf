"""`minhash` signatures, exact digests and band hashes against a naive per-document
reference written from the module's description (Python integers, one shingle at a time)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from blues_train.mixture import minhash
from reference import MASK, splitmix64


def naive_signature(tokens: list[int]) -> list[int]:
    mix = [int(m) for m in minhash._MIX]
    n = minhash.SHINGLE
    if len(tokens) >= n:
        shingles = [tokens[p: p + n] for p in range(len(tokens) - n + 1)]
    else:
        shingles = [tokens + [1 << 32] * (n - len(tokens))]
    bins = [None] * minhash.PERMUTATIONS
    for shingle in shingles:
        h = splitmix64(sum(t * m for t, m in zip(shingle, mix)) & MASK)
        b, value = h >> (64 - minhash.BIN_BITS), h & 0xFFFFFFFF
        bins[b] = value if bins[b] is None else min(bins[b], value)
    signature = []
    for j in range(minhash.PERMUTATIONS):
        d = next(d for d in range(minhash.PERMUTATIONS) if bins[(j + d) % minhash.PERMUTATIONS] is not None)
        signature.append((bins[(j + d) % minhash.PERMUTATIONS] + d * int(minhash.ROTATION)) & 0xFFFFFFFF)
    return signature


def naive_bands(signature: list[int]) -> list[int]:
    mix, rows = [int(m) for m in minhash._BAND_MIX], minhash.ROWS
    return [splitmix64(sum(v * m for v, m in zip(signature[b * rows:(b + 1) * rows], mix)) & MASK)
            for b in range(minhash.BANDS)]


def test_signatures_digests_and_bands_are_the_naive_ones():
    rng = np.random.default_rng(26)
    lengths = rng.choice([0, 1, 2, 4, 5, 6, 40, 300, 2000], size=60)
    lengths[10:14] = 3  # consecutive short documents
    tokens = rng.integers(0, 200_019, size=int(lengths.sum()), dtype=np.uint32)
    tokens[-50:] = tokens[:50]  # a repeated run: equal shingles in two documents
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows, signature = minhash.signatures(tokens, offsets)
    assert rows.tolist() == np.flatnonzero(lengths).tolist()
    digests, bands = minhash.exact_digests(tokens, offsets, rows), minhash.band_hashes(signature)
    for i, row in enumerate(rows.tolist()):
        doc = tokens[offsets[row]: offsets[row + 1]].tolist()
        want = naive_signature(doc)
        assert signature[i].tolist() == want, row
        assert bands[i].tolist() == naive_bands(want), row
        digest = hashlib.blake2b(struct.pack(f"<{len(doc)}I", *doc), digest_size=16).digest()
        assert digests[i].tolist() == list(struct.unpack("<2Q", digest)), row
