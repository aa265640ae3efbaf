"""The mixture format: `mixture.json`, what it records and the rules it fixes.

A mixture is one small `mixture.json`, never a copy of the tokens: which stores (by path
and fingerprint), the share of each, how many tokens each contributes to one pass of the
mixture (and so how often it repeats), the seed and the validation hold-out rule.
`blues merge` (`blues_train.mixture.merge`) writes it; the loader (`blues_train.mixture.loader`) turns it
into packed training windows; `blues verify` checks it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from blues_train.data import store
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.io.settings import Settings, validated

FORMAT_VERSION = 1
STRATEGIES = ("weighted", "equal", "proportional")
MIXTURE_FILE = "mixture.json"
DEFAULT_VAL_FRACTION = 0.01
VALIDATION_RULE = (
    "a document is held out for validation iff "
    "splitmix64((int(source_sha256[:16], 16) + index) mod 2**64) < fraction * 2**64, "
    "where source_sha256 is its raw file's sha256 in the store manifest and index its "
    "0-based position in that file"
)
MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 (wrapping arithmetic): a well-mixed 64-bit hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)  # a new array: the rest works in place
    shifted = x >> np.uint64(30)
    x ^= shifted
    x *= np.uint64(0xBF58476D1CE4E5B9)
    np.right_shift(x, np.uint64(27), out=shifted)
    x ^= shifted
    x *= np.uint64(0x94D049BB133111EB)
    np.right_shift(x, np.uint64(31), out=shifted)
    x ^= shifted
    return x


def held_out(source_sha256: str, indices: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents (by index within one raw file) belong to the validation split.

    The rule depends only on the document's identity, not on the store, chunking, seed
    or mixture, so the same document is held out in every mixture that contains it.
    """
    return held_out_by_base(np.uint64(source_base(source_sha256)), indices, fraction)


def source_base(source_sha256: str) -> int:
    """What the validation rule adds a document's index to: its raw file's sha256, first 64 bits."""
    return int(source_sha256[:16], 16)


def held_out_by_base(bases, indices, fraction: float) -> np.ndarray:
    """`held_out` for documents of many raw files at once: `bases[i]` is document i's
    `source_base` (uint64), `indices[i]` its index in that file."""
    with np.errstate(over="ignore"):
        hashed = splitmix64(np.asarray(bases, dtype=np.uint64) + np.asarray(indices, dtype=np.uint64))
    threshold = min(int(fraction * 2.0**64), MASK64)
    return hashed < np.uint64(threshold)


def read_mixture(mixture_dir) -> dict:
    """The mixture manifest of `mixture_dir`; BluesError if absent or malformed."""
    path = storage.path(mixture_dir) / MIXTURE_FILE
    if not path.is_file():
        raise BluesError(f"{path}: no mixture manifest here; create one with `blues merge`")
    manifest = storage.read_json(path)
    if not isinstance(manifest, dict) or manifest.get("kind") != "mixture":
        raise BluesError(f"{path}: not a mixture manifest (field 'kind' must be 'mixture')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BluesError(
            f"{path}: format_version {manifest.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; re-run `blues merge`"
        )
    validated(MixtureFile, manifest, f"{path}: ", advice="; re-run `blues merge`")
    return manifest


Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


class MixtureSource(Settings):
    path: str = Field(min_length=1)
    fingerprint: store.Sha256
    weight: Share
    tokens: Count
    repeat: float = Field(ge=0, allow_inf_nan=False)
    docs: Count


class ValidationSplit(Settings):
    fraction: float = Field(ge=0, lt=1, allow_inf_nan=False)
    rule: str


class DedupRecord(Settings):
    """The dedup result (`blues dedup`) whose removed documents the loader drops."""

    path: str = Field(min_length=1)
    fingerprint: store.Sha256


class MixtureFile(Settings):
    """Every field of `mixture.json` (`blues_train.mixture.merge.mixture_manifest` writes it)."""

    format_version: Literal[FORMAT_VERSION]
    kind: Literal["mixture"]
    strategy: Literal[STRATEGIES]
    weights_given: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None
    weights: list[Share]
    sources: list[MixtureSource] = Field(min_length=1)
    seed: Count
    total_tokens: int = Field(gt=0)
    validation: ValidationSplit
    tokenizer: store.TokenizerRecord
    dedup: DedupRecord | None = None
    fingerprint: store.Sha256


def mixture_fingerprint(manifest: dict) -> str:
    """The mixture's identity: what data, in which amounts, split and seeded how."""
    identity = {
        "tokenizer": manifest["tokenizer"]["vocab_sha256"],
        "sources": [[s["fingerprint"], s["tokens"]] for s in manifest["sources"]],
        "seed": manifest["seed"],
        "validation": manifest["validation"],
    }
    if manifest.get("dedup"):  # a mixture without one keeps the identity it always had
        identity["dedup"] = manifest["dedup"]["fingerprint"]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def source_manifest(entry: dict, data: bytes | None = None) -> dict:
    """The store manifest of a mixture source (an entry of `sources`; `data`: the manifest's
    bytes, already read); BluesError if the store changed after merging: its fingerprint,
    recomputed from its tokenizer and chunk hashes, is not the one the mixture recorded."""
    manifest = store.read_manifest(entry["path"], data)
    current = store.store_fingerprint(manifest)
    if current != entry["fingerprint"]:
        raise BluesError(
            f"{storage.path(entry['path']) / store.MANIFEST}: fingerprint {current[:16]} differs from "
            f"{entry['fingerprint'][:16]} recorded in the mixture: the dataset changed after "
            "merging; run `blues merge` again"
        )
    return manifest
