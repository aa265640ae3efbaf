"""MinHash signatures of token stores' documents: numpy over token ids, one chunk at a time.

A document's shingles are its token 5-grams (a document shorter than that: one shingle of
all its tokens), each hashed to 64 bits (splitmix64 of a polynomial of the ids). Its
signature is a one-permutation MinHash (Li, Owen and Zhang 2012) densified by rotation
(Shrivastava and Li 2014): the top 8 bits of a shingle's hash pick one of
PERMUTATIONS = 256 bins, the low 32 bits are its value, and each bin keeps its documents'
least value; an empty bin (a document of fewer shingles than bins) takes the value of the
next filled bin to its right, offset by the distance. Two signatures agree at a position
with probability the shingle sets' Jaccard J, so the share of equal positions estimates
J (standard deviation about sqrt(J (1 - J) / 256): 0.022 at J = 0.85). One hash per
shingle instead of 256: 256-permutation multiply-shift MinHash measured 0.26M tokens/s
per core here, this one about 40 times that (docs/benchmarks.md).

LSH: the signature is cut into BANDS bands of ROWS rows; two documents become a candidate
pair when a whole band agrees, with probability 1 - (1 - J**ROWS)**BANDS:
J = 0.5: 0.118, 0.6: 0.42, 0.7: 0.87, 0.8: 0.9972, 0.85: 0.99997, 0.9: 1.0 (32 bands of 8).
Candidates are kept when their estimated Jaccard reaches the threshold.

Exact duplicates: a 128-bit blake2b digest of the document's token ids (as uint32 bytes).
datasketch was not used: it hashes shingle by shingle in Python, and these are token ids
already, which numpy hashes a chunk at a time.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from blues_train.mixture.spec import splitmix64

SHINGLE = 5
PERMUTATIONS = 256
BANDS, ROWS = 32, 8
SEED = 0x5EED_B1E5
_MIX = np.random.default_rng([SEED, 0]).integers(1, 1 << 63, size=SHINGLE, dtype=np.uint64) | np.uint64(1)
BIN_BITS = 8  # 2**BIN_BITS == PERMUTATIONS
EMPTY = np.uint64(1 << 32)  # above every 32-bit value
ROTATION = np.uint64(0x9E3779B9)  # a densified bin's offset per bin of distance
_BAND_MIX = np.random.default_rng([SEED, 3]).integers(1, 1 << 63, size=ROWS, dtype=np.uint64) | np.uint64(1)
PAST_END = np.uint64(1 << 32)  # stands for "no token": ids are uint32

def band_column(band: int) -> str:
    return f"band_{band:02d}"


SIGNATURE_SCHEMA = pa.schema(
    [("row", pa.int32()), ("exact_hi", pa.uint64()), ("exact_lo", pa.uint64()),
     ("signature", pa.list_(pa.uint32(), PERMUTATIONS))]
    + [(band_column(b), pa.uint64()) for b in range(BANDS)]
)


def parameters() -> dict:
    """What a signature depends on besides the tokens (recorded in dedup.json)."""
    return {"shingle_tokens": SHINGLE, "permutations": PERMUTATIONS, "bands": BANDS, "rows": ROWS,
            "seed": SEED, "hash": "splitmix64 of 5-gram ids; multiply-shift minhash; blake2b-128 exact"}


def shingle_hashes(tokens: np.ndarray, offsets: np.ndarray):
    """(hashes, counts): the uint64 hash of every shingle of a chunk's documents (`offsets`:
    each document's first token, then the end), in row order, and each row's number of
    shingles (len - SHINGLE + 1; 1 for a short non-empty document, 0 for an empty one)."""
    lengths = np.diff(offsets)
    ids = tokens.astype(np.uint64)
    n = max(len(ids) - SHINGLE + 1, 0)
    with np.errstate(over="ignore"):
        mixed = ids[:n] * _MIX[0]
        term = np.empty_like(mixed)
        for k in range(1, SHINGLE):
            np.multiply(ids[k: k + n], _MIX[k], out=term)
            mixed += term
    inside = np.ones(n, dtype=bool)  # a 5-gram starting in the last SHINGLE - 1 tokens of a document crosses its end
    last = (offsets[1:, None] - np.arange(1, SHINGLE)).ravel()
    inside[last[(last >= 0) & (last < n)]] = False
    short = np.flatnonzero((lengths > 0) & (lengths < SHINGLE))
    counts = np.maximum(lengths - (SHINGLE - 1), 0)
    counts[short] = 1
    hashes = np.empty(int(counts.sum()), dtype=np.uint64)
    at_short = (np.cumsum(counts) - counts)[short]
    whole = np.ones(len(hashes), dtype=bool)
    whole[at_short] = False
    hashes[whole] = mixed[inside]
    hashes[at_short] = short_shingles(ids, offsets, short)
    return splitmix64(hashes), counts


def short_shingles(ids: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The unmixed hash of the one shingle of each document in `rows` (fewer than SHINGLE tokens)."""
    out = np.zeros(len(rows), dtype=np.uint64)
    starts, ends = offsets[rows], offsets[rows + 1]
    with np.errstate(over="ignore"):
        for k in range(SHINGLE):
            inside = starts + k < ends
            out += np.where(inside, ids[np.minimum(starts + k, len(ids) - 1)], PAST_END) * _MIX[k]
    return out


def signatures(tokens: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, signatures): the non-empty documents of a chunk and their (n, PERMUTATIONS)
    uint32 densified one-permutation MinHash signatures."""
    hashes, counts = shingle_hashes(tokens, offsets)
    rows = np.flatnonzero(counts)
    key = np.repeat(np.arange(len(rows), dtype=np.int64) * PERMUTATIONS, counts[rows])
    key += (hashes >> np.uint64(64 - BIN_BITS)).astype(np.int64)
    bins = np.full(len(rows) * PERMUTATIONS, EMPTY, dtype=np.uint64)
    np.minimum.at(bins, key, hashes & np.uint64(0xFFFFFFFF))
    return rows.astype(np.int32), densified(bins.reshape(len(rows), PERMUTATIONS))


def densified(bins: np.ndarray) -> np.ndarray:
    """Each empty bin given the next filled bin's value (circularly), offset by the distance.
    Rows with no empty bin (long documents) are taken as they are."""
    out = bins.astype(np.uint32)  # a filled bin's value is below 2**32
    sparse = np.flatnonzero((bins == EMPTY).any(axis=1))
    if not len(sparse):
        return out
    bins = bins[sparse]
    width = np.arange(2 * PERMUTATIONS, dtype=np.int16)
    filled = np.where(np.tile(bins != EMPTY, 2), width, np.int16(2 * PERMUTATIONS))
    nearest = np.minimum.accumulate(filled[:, ::-1], axis=1)[:, ::-1][:, :PERMUTATIONS]
    distance = (nearest - width[:PERMUTATIONS]).astype(np.uint64)
    values = np.take_along_axis(bins, (nearest % PERMUTATIONS).astype(np.intp), axis=1)
    with np.errstate(over="ignore"):
        out[sparse] = ((values + distance * ROTATION) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def band_hashes(signature: np.ndarray) -> np.ndarray:
    """(n, BANDS) uint64: each band's ROWS values hashed together."""
    rows = signature.reshape(len(signature), BANDS, ROWS).astype(np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64((rows * _BAND_MIX).sum(axis=2, dtype=np.uint64))


def exact_digests(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 2) uint64: blake2b-128 of each document's token ids (their bytes, hashed
    in place: no copy per document)."""
    data = memoryview(np.ascontiguousarray(tokens)).cast("B")
    size = tokens.dtype.itemsize
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(data[a:b], digest_size=16).digest()
                        for a, b in zip((offsets[rows] * size).tolist(), (offsets[rows + 1] * size).tolist())])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64).reshape(len(rows), 2)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The share of equal positions of row-aligned signatures a and b."""
    return (a == b).mean(axis=-1)
