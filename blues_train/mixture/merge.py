"""`blues merge`: blend token stores into a mixture by **token** share (merge_data.py).

Merging reads only the stores' manifests and writes one `mixture.json` (the format:
`blues_train.mixture.spec`). Notices and warnings (weights normalized, a source repeated) go
to a logger: `blues merge` prints them on stderr, Dagster shows them in its run log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from blues_train.data import store
from blues_train.data.tokenizer import tokenizer_mismatch
from blues_train.io import command_line, storage
from blues_train.io.errors import BluesError
from blues_train.io.folder_lock import check_held, exclusive_writer
from blues_train.io.settings import Settings, read_json, validated
from blues_train.mixture.spec import (
    DEFAULT_VAL_FRACTION,
    FORMAT_VERSION,
    MIXTURE_FILE,
    STRATEGIES,
    VALIDATION_RULE,
    mixture_fingerprint,
)
from blues_train.mixture.verify import verify_paths

DEFAULT_OUTPUT = "data_cache/merged"
LOG = logging.getLogger("blues_train.mixture.merge")


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
    dedup=None,
    log: logging.Logger = LOG,
    progress: bool = False,
) -> dict:
    """Write `out_dir/mixture.json` blending the token stores `datasets`; return it.

    No weights and no strategy means `equal`; weights means `weighted`; `proportional`
    weighs by token counts. Every check runs before anything is written. `progress`: a bar
    of the verification on a terminal's stderr. `dedup`: a `blues dedup` result folder whose
    removed documents the mixture leaves out (shares are over what remains).
    """
    strategy = resolve_strategy(strategy, weights)
    paths = [storage.path(d) for d in datasets]
    manifests = read_sources(paths)
    check_options(num_tokens, val_fraction, seed, storage.path(out_dir))
    if dedup is not None:
        manifests = deduplicated(manifests, dedup)
    shares = target_shares(strategy, weights, manifests, paths, log)
    if verify:
        verify_sources(paths, progress)
    with exclusive_writer(out_dir):
        manifest = mixture_manifest(strategy, weights, shares, paths, manifests, num_tokens, seed,
                                    val_fraction)
        report_repeats(manifest, log)
        check_held(out_dir)
        storage.write_json(storage.path(out_dir) / MIXTURE_FILE, manifest)
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
    if "dedup" in manifests[0]:
        manifest["dedup"] = manifests[0]["dedup"]
    manifest["fingerprint"] = mixture_fingerprint(manifest)
    return manifest


def deduplicated(manifests: list[dict], folder) -> list[dict]:
    """The store manifests as a dedup result leaves them: totals of the remaining documents,
    and the result's record (`dedup`) for mixture.json."""
    from blues_train.mixture import dedup  # only a merge with --dedup reads Parquet

    entry, result = dedup.mixture_record(folder, [m["fingerprint"] for m in manifests])
    out = []
    for manifest in manifests:
        counts = dedup.removal_counts(result, manifest["fingerprint"])
        totals = {"docs": manifest["totals"]["docs"] - counts["docs"],
                  "tokens": manifest["totals"]["tokens"] - counts["tokens"]}
        out.append({**manifest, "totals": totals, "dedup": entry})
    return out


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
    for path, manifest in zip(paths, manifests):
        mismatch = tokenizer_mismatch(manifest["tokenizer"])
        if mismatch:
            raise BluesError(f"{path}/manifest.json: {mismatch}; prepare the dataset again")
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


def check_options(num_tokens, val_fraction, seed, out_dir: Path) -> None:
    if num_tokens is not None and int(num_tokens) <= 0:
        raise BluesError(f"--num_tokens must be positive, got {num_tokens}")
    if not 0 <= val_fraction < 1:
        raise BluesError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if int(seed) < 0:
        raise BluesError(f"--seed must be zero or more, got {seed}")
    storage.check_output_folder(out_dir, "--output")


def target_shares(strategy: str, weights, manifests: list[dict], paths, log: logging.Logger) -> np.ndarray:
    """Normalized token shares, one per dataset."""
    if strategy == "equal":
        return np.full(len(manifests), 1 / len(manifests))
    if strategy == "proportional":
        sizes = np.array([m["totals"]["tokens"] for m in manifests], dtype=float)
        return sizes / sizes.sum()
    return normalized_weights(weights, paths, log)


def normalized_weights(weights, paths, log: logging.Logger) -> np.ndarray:
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
        log.info(f"notice: weights sum to {given_sum:g}; normalized to {normalized}")
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
        "path": storage.display(path),
        "fingerprint": manifest["fingerprint"],
        "weight": float(share),
        "tokens": tokens,
        "repeat": round(tokens / available, 4) if available else 0.0,
        "docs": manifest["totals"]["docs"],
    }


def report_repeats(manifest: dict, log: logging.Logger) -> None:
    for source in manifest["sources"]:
        if source["repeat"] > 1:
            log.warning(
                f"warning: {source['path']} is repeated {source['repeat']:.2f}x to reach its "
                f"share {source['weight']:.4f} of {manifest['total_tokens']} tokens"
            )


def verify_sources(paths: list[Path], progress: bool = False) -> None:
    report = verify_paths(paths, progress)
    if not report.ok:
        problems = "\n".join(report.problem_lines())
        raise BluesError(f"datasets failed verification, nothing written:\n{problems}")


@contextlib.contextmanager
def log_on_stderr(log: logging.Logger = LOG):
    """While inside, each of the log's messages (notices included) is a line on stderr."""
    if any(getattr(h, "stream", None) is sys.stderr for h in log.handlers):
        yield log  # it prints there already
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def flag_parser() -> argparse.ArgumentParser:
    parser = command_line.flag_parser("blues merge", "Blend token stores into a mixture by token share.")
    parser.add_argument("--datasets", nargs="+", help="token store folders (default: --config's paths)")
    parser.add_argument("--weights", nargs="+", type=float,
                        help="one weight per dataset (default: --config's, else none: equal shares)")
    parser.add_argument("--strategy", help="weighted | equal | proportional (default: weighted with "
                        "--weights, else equal)")
    parser.add_argument("--output", help=f"mixture folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--num_tokens", type=int,
                        help="training tokens per pass (default: the sources' training tokens)")
    parser.add_argument("--seed", type=int, default=0, help="the order of documents in each pass")
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of each source's documents held out for validation")
    parser.add_argument("--config", help='config.json with {"datasets": {"paths", "weights", '
                        '"merge_strategy"}}; flags given here win (default: none)')
    parser.add_argument("--verify", action="store_true", help="verify the datasets first")
    parser.add_argument("--dedup", help="a `blues dedup` result folder: its removed documents are left out "
                        "(default: none, every document)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return flag_parser().parse_args(argv)


class DatasetsSection(Settings):
    """The `datasets` section of the original config.json."""

    paths: list[str] = Field(min_length=1)
    weights: list[float] | None = Field(None, min_length=1)
    merge_strategy: Literal[STRATEGIES] | None = None

    @field_validator("weights")
    @classmethod
    def _usable(cls, weights):
        if weights is not None and (any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError("weights must be finite, non-negative and not all zero")
        return weights


def read_config(path: str) -> dict:
    """The `datasets` section of an original config.json, as given (unset keys left out)."""
    raw = read_json(path, "--config")
    if "datasets" not in raw:
        raise BluesError(f"--config {path}: has no datasets section (paths, weights, merge_strategy)")
    section = validated(DatasetsSection, raw.get("datasets"), f"--config {path}: datasets: ")
    return section.model_dump(exclude_unset=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = read_config(args.config) if args.config else {}
    with log_on_stderr() as log:
        manifest = merge(
            args.datasets or config.get("paths") or [],
            args.output or DEFAULT_OUTPUT,
            weights=args.weights or config.get("weights"),
            strategy=args.strategy or config.get("merge_strategy"),
            num_tokens=args.num_tokens,
            seed=args.seed,
            val_fraction=args.val_fraction,
            verify=args.verify,
            dedup=args.dedup,
            log=log,
            progress=True,
        )
    print(share_table(manifest))
    print(f"wrote {storage.path(args.output or DEFAULT_OUTPUT) / MIXTURE_FILE} "
          f"(fingerprint {manifest['fingerprint'][:16]})")
    return 0


def share_table(manifest: dict) -> str:
    """Shares and training tokens per pass (`blues verify` labels its columns the same way)."""
    lines = [f"{'dataset':<48} {'share':>7} {'tokens/pass':>14} {'repeat':>7}"]
    for s in manifest["sources"]:
        lines.append(f"{s['path'][-48:]:<48} {s['weight']:>7.4f} {s['tokens']:>14,} {s['repeat']:>7.2f}")
    lines.append(f"{'total (' + manifest['strategy'] + ')':<48} {1:>7.4f} "
                 f"{manifest['total_tokens']:>14,}")
    lines.append("tokens/pass: training tokens drawn from each dataset per pass, repeats included; repeat: "
                 "estimated from --val_fraction (blues verify counts the held-out documents)")
    return "\n".join(lines)


if __name__ == "__main__":
    from blues_train.io.command_line import run_command

    sys.exit(run_command(main, sys.argv[1:]))
