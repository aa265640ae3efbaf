"""`blues merge`: blend token stores into a mixture by **token** share (merge_data.py).

A mixture is one small `mixture.json`, never a copy of the tokens: which stores (by path
and fingerprint), the share of each, how many tokens each contributes to one pass of the
mixture (and so how often it repeats), the seed and the validation hold-out rule. Merging
reads only the stores' manifests. The loader (`blues_train.loader`) turns it into packed
training windows; `blues verify` checks it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from blues_train import store
from blues_train.atomic import write_json_atomic
from blues_train.errors import BluesError
from blues_train.folder_lock import exclusive_writer

FORMAT_VERSION = 1
MIXTURE_FILE = "mixture.json"
STRATEGIES = ("weighted", "equal", "proportional")
DEFAULT_OUTPUT = "data_cache/merged"
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
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def held_out(source_sha256: str, indices: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents (by index within one raw file) belong to the validation split.

    The rule depends only on the document's identity, not on the store, chunking, seed
    or mixture, so the same document is held out in every mixture that contains it.
    """
    base = np.uint64(int(source_sha256[:16], 16))
    with np.errstate(over="ignore"):
        hashed = splitmix64(base + np.asarray(indices, dtype=np.uint64))
    threshold = min(int(fraction * 2.0**64), MASK64)
    return hashed < np.uint64(threshold)


def read_mixture(mixture_dir) -> dict:
    """The mixture manifest of `mixture_dir`; BluesError if absent or malformed."""
    path = Path(mixture_dir) / MIXTURE_FILE
    if not path.is_file():
        raise BluesError(f"{path}: no mixture manifest here; create one with `blues merge`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BluesError(f"{path}: unreadable mixture manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "mixture":
        raise BluesError(f"{path}: not a mixture manifest (field 'kind' must be 'mixture')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BluesError(
            f"{path}: format_version {manifest.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; re-run `blues merge`"
        )
    required = ("sources", "weights", "total_tokens", "seed", "validation", "fingerprint")
    for field in required:
        if field not in manifest:
            raise BluesError(f"{path}: field {field!r} is missing; re-run `blues merge`")
    return manifest


def mixture_fingerprint(manifest: dict) -> str:
    """The mixture's identity: what data, in which amounts, split and seeded how."""
    identity = {
        "tokenizer": manifest["tokenizer"]["vocab_sha256"],
        "sources": [[s["fingerprint"], s["tokens"]] for s in manifest["sources"]],
        "seed": manifest["seed"],
        "validation": manifest["validation"],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def merge(
    datasets,
    out_dir=DEFAULT_OUTPUT,
    *,
    weights=None,
    strategy=None,
    num_tokens=None,
    seed=0,
    val_fraction=DEFAULT_VAL_FRACTION,
    verify=False,
) -> dict:
    """Write `out_dir/mixture.json` blending the token stores `datasets`; return it.

    No weights and no strategy means `equal`; weights means `weighted`; `proportional`
    weighs by token counts. Every check runs before anything is written.
    """
    strategy = resolve_strategy(strategy, weights)
    paths = [Path(d) for d in datasets]
    manifests = read_sources(paths)
    check_options(num_tokens, val_fraction, seed, Path(out_dir))
    shares = target_shares(strategy, weights, manifests, paths)
    if verify:
        verify_sources(paths)
    with exclusive_writer(out_dir):
        manifest = mixture_manifest(strategy, weights, shares, paths, manifests, num_tokens, seed,
                                    val_fraction)
        report_repeats(manifest)
        write_json_atomic(Path(out_dir) / MIXTURE_FILE, manifest)
    return manifest


def mixture_manifest(strategy, weights, shares, paths, manifests, num_tokens, seed, val_fraction) -> dict:
    available = [round(m["totals"]["tokens"] * (1 - val_fraction)) for m in manifests]
    total = int(num_tokens) if num_tokens is not None else sum(available)
    tokens = hamilton_round(shares, total)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "mixture",
        "strategy": strategy,
        "weights_given": None if weights is None else [float(w) for w in weights],
        "weights": [float(s) for s in shares],
        "sources": [
            source_entry(path, m, share, n, avail)
            for path, m, share, n, avail in zip(paths, manifests, shares, tokens, available)
        ],
        "seed": int(seed),
        "total_tokens": total,
        "validation": {"fraction": float(val_fraction), "rule": VALIDATION_RULE},
        "tokenizer": manifests[0]["tokenizer"],
    }
    manifest["fingerprint"] = mixture_fingerprint(manifest)
    return manifest


def resolve_strategy(strategy, weights) -> str:
    if strategy is None:
        return "equal" if weights is None else "weighted"
    if strategy not in STRATEGIES:
        raise BluesError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "weighted" and weights is None:
        raise BluesError("strategy 'weighted' needs --weights, one per dataset")
    if strategy != "weighted" and weights is not None:
        raise BluesError(f"strategy {strategy!r} takes no --weights; drop them or use 'weighted'")
    return strategy


def read_sources(paths: list[Path]) -> list[dict]:
    """Each dataset's store manifest, after the checks that make a blend meaningful."""
    if not paths:
        raise BluesError("no datasets given; pass --datasets DIR [DIR ...]")
    for path in paths:
        if not path.exists():
            raise BluesError(f"{path}: dataset not found; prepare it with `blues prepare`")
    manifests = [store.read_manifest(path) for path in paths]
    check_distinct(paths, manifests)
    check_same_tokenizer(paths, manifests)
    for path, manifest in zip(paths, manifests):
        if manifest["totals"]["tokens"] <= 0:
            raise BluesError(f"{path}/manifest.json: dataset holds no tokens")
    return manifests


def check_distinct(paths: list[Path], manifests: list[dict]) -> None:
    """No dataset twice: by folder, by tokens, or by raw sources (whatever the chunking)."""
    seen = {}
    for path, manifest in zip(paths, manifests):
        raw = (
            tuple(sorted(source["sha256"] for source in manifest["sources"])),
            manifest.get("settings", {}).get("text_field"),
        )
        for key in (path.resolve(), manifest["fingerprint"], raw):
            if key in seen:
                raise BluesError(
                    f"{path}: the same dataset as {seen[key]} is given twice (same folder, tokens "
                    "or raw sources and --text_field); list each dataset once and use --weights "
                    "to give it a larger share"
                )
            seen[key] = path


def check_same_tokenizer(paths: list[Path], manifests: list[dict]) -> None:
    first = manifests[0]["tokenizer"]
    for path, manifest in zip(paths[1:], manifests[1:]):
        other = manifest["tokenizer"]
        if (other["name"], other["vocab_sha256"]) != (first["name"], first["vocab_sha256"]):
            raise BluesError(
                f"{path}/manifest.json: tokenizer {other['name']} ({other['vocab_sha256'][:12]}) "
                f"differs from {paths[0]}'s {first['name']} ({first['vocab_sha256'][:12]}); "
                "re-prepare the datasets with one tokenizer"
            )


def check_options(num_tokens, val_fraction, seed, out_dir: Path) -> None:
    if num_tokens is not None and int(num_tokens) <= 0:
        raise BluesError(f"--num_tokens must be positive, got {num_tokens}")
    if not 0 <= val_fraction < 1:
        raise BluesError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if int(seed) < 0:
        raise BluesError(f"--seed must be zero or more, got {seed}")
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise BluesError(f"--output {out_dir}: {blocking} is a file, not a folder")


def target_shares(strategy: str, weights, manifests: list[dict], paths) -> np.ndarray:
    """Normalized token shares, one per dataset."""
    if strategy == "equal":
        return np.full(len(manifests), 1 / len(manifests))
    if strategy == "proportional":
        sizes = np.array([m["totals"]["tokens"] for m in manifests], dtype=float)
        return sizes / sizes.sum()
    return normalized_weights(weights, paths)


def normalized_weights(weights, paths) -> np.ndarray:
    if len(weights) != len(paths):
        raise BluesError(
            f"{len(weights)} weights for {len(paths)} datasets; give one weight per dataset"
        )
    try:
        values = np.array([float(w) for w in weights])
    except (TypeError, ValueError):
        raise BluesError(f"weights {list(weights)} must all be numbers") from None
    for path, value in zip(paths, values):
        if not math.isfinite(value) or value < 0:
            raise BluesError(f"weight {value} for {path} must be a finite number >= 0")
    if values.max() == 0:
        raise BluesError("all weights are zero; give at least one dataset a positive weight")
    given_sum = float(np.sum(values))  # inf for weights near the float limit
    scaled = values / values.max()  # whose sum cannot overflow
    shares = scaled / scaled.sum()
    if not math.isclose(given_sum, 1.0, rel_tol=1e-9):
        normalized = ", ".join(f"{v:.4f}" for v in shares)
        notify(f"notice: weights sum to {given_sum:g}; normalized to {normalized}")
    return shares


def hamilton_round(shares: np.ndarray, total: int) -> list[int]:
    """Whole token counts in the ratio `shares` summing exactly to `total`."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return [int(c) for c in counts]


def source_entry(path: Path, manifest: dict, share: float, tokens: int, available: int) -> dict:
    return {
        "path": str(path.resolve()),
        "fingerprint": manifest["fingerprint"],
        "weight": float(share),
        "tokens": tokens,
        "repeat": round(tokens / available, 4) if available else 0.0,
        "docs": manifest["totals"]["docs"],
    }


def report_repeats(manifest: dict) -> None:
    for source in manifest["sources"]:
        if source["repeat"] > 1:
            notify(
                f"warning: {source['path']} is repeated {source['repeat']:.2f}x to reach its "
                f"share {source['weight']:.4f} of {manifest['total_tokens']} tokens"
            )


def verify_sources(paths: list[Path]) -> None:
    from blues_train.verify import verify_paths  # verify imports this module

    report = verify_paths(paths)
    if not report.ok:
        problems = "\n".join(report.problem_lines())
        raise BluesError(f"datasets failed verification, nothing written:\n{problems}")


def notify(message: str) -> None:
    print(message, file=sys.stderr)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="blues merge", description="Blend token stores into a mixture by token share."
    )
    parser.add_argument("--datasets", nargs="+", help="token store folders")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per dataset")
    parser.add_argument("--strategy", help="weighted | equal | proportional")
    parser.add_argument("--output", help=f"mixture folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--num_tokens", type=int, help="mixture size (default: sum of sources)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--config", help='config.json with {"datasets": {"paths", "weights", '
                        '"merge_strategy"}}; flags given here win')
    parser.add_argument("--verify", action="store_true", help="verify the datasets first")
    return parser.parse_args(argv)


def read_config(path: str) -> dict:
    """The `datasets` section of an original config.json."""
    try:
        section = json.loads(Path(path).read_text()).get("datasets")
    except (OSError, ValueError, AttributeError) as exc:
        raise BluesError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(section, dict):
        raise BluesError(f"{path}: field 'datasets' must be an object with 'paths'")
    unknown = set(section) - {"paths", "weights", "merge_strategy"}
    if unknown:
        raise BluesError(f"{path}: unknown field(s) datasets.{', datasets.'.join(sorted(unknown))}")
    for field_name in ("paths", "weights"):
        if field_name in section and not isinstance(section[field_name], list):
            raise BluesError(f"{path}: datasets.{field_name} must be a list, got {section[field_name]!r}")
    return section


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = read_config(args.config) if args.config else {}
    manifest = merge(
        args.datasets or config.get("paths") or [],
        args.output or DEFAULT_OUTPUT,
        weights=args.weights or config.get("weights"),
        strategy=args.strategy or config.get("merge_strategy"),
        num_tokens=args.num_tokens,
        seed=args.seed,
        val_fraction=args.val_fraction,
        verify=args.verify,
    )
    print(share_table(manifest))
    print(f"wrote {Path(args.output or DEFAULT_OUTPUT) / MIXTURE_FILE} "
          f"(fingerprint {manifest['fingerprint'][:16]})")
    return 0


def share_table(manifest: dict) -> str:
    lines = [f"{'dataset':<48} {'share':>7} {'tokens':>14} {'repeat':>7}"]
    for s in manifest["sources"]:
        lines.append(f"{s['path'][-48:]:<48} {s['weight']:>7.4f} {s['tokens']:>14,} {s['repeat']:>7.2f}")
    lines.append(f"{'total (' + manifest['strategy'] + ')':<48} {1:>7.4f} "
                 f"{manifest['total_tokens']:>14,}")
    return "\n".join(lines)


if __name__ == "__main__":
    from blues_train.cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
