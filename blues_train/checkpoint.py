"""Training checkpoints: atomic folders, the last K kept, resumable on any number of ranks.

    OUT/checkpoints/step-000100/
        deepspeed/          engine.save_checkpoint: module, ZeRO optimizer shards, scheduler
        model.safetensors   consolidated fp32 weights, loadable without DeepSpeed
        config.json         the model config (BluesConfig.to_dict())
        meta.json           step, losses, loader state, mixture fingerprint, code version,
                            world size; written last, so its presence marks a complete folder
        universal/          only after a resume on another world size (see below)

Every rank writes into `OUT/checkpoints/.tmp-step-000100/`; after a barrier rank 0 renames
it to `step-000100`. A rename is atomic, so a run killed while saving leaves only a `.tmp-`
folder, which `--resume auto` ignores and the next save replaces.

ZeRO shards the optimizer state by rank, and DeepSpeed refuses to load a ZeRO checkpoint on
another data-parallel world size. Resuming on a different number of ranks converts the
folder once to DeepSpeed's *universal* format (`deepspeed.checkpoint.ds_to_universal`:
one file per parameter and state, no rank layout) and loads that with
`"checkpoint": {"load_universal": true}`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from argparse import Namespace
from contextlib import redirect_stdout
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from blues_train.atomic import sync_dir, write_json_atomic
from blues_train.errors import BluesError

FORMAT_VERSION = 1
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
UNIVERSAL_DIR = "universal"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
STEP_NAME = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(folder) -> bool:
    """A checkpoint folder whose save finished: meta.json (written last) parses."""
    folder = Path(folder)
    try:
        json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (folder / MODEL_FILE).is_file() and (folder / DEEPSPEED_DIR / DEEPSPEED_TAG).is_dir()


def complete_checkpoints(root) -> list[Path]:
    """The complete `step-N` folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, root) -> Path | None:
    """`--resume auto` -> the latest complete checkpoint under `root` (None: start fresh);
    `--resume PATH` -> that folder, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise BluesError(f"--resume {resume}: not a complete checkpoint folder (needs {META_FILE}, "
                         f"{MODEL_FILE} and {DEEPSPEED_DIR}/); pass a step-N folder or 'auto'")
    return path


def check_start(root, resume_from: Path | None, set_aside: bool) -> None:
    """Refuse to start from scratch over another run's checkpoints; with `set_aside` (rank
    0), move the checkpoints past a rolled-back resume point out of the way: they belong to
    an abandoned future and would otherwise win `--resume auto` and the keep-last rotation."""
    found = complete_checkpoints(root)
    if resume_from is None:
        if found:
            raise BluesError(f"{root} already holds checkpoints up to {found[-1].name}: pass "
                             "--resume auto to continue that run, or choose another --out")
        return
    resumed = int(STEP_NAME.match(Path(resume_from).name).group(1))
    later = [p for p in found if int(STEP_NAME.match(p.name).group(1)) > resumed]
    if set_aside and later and Path(resume_from).resolve().parent == Path(root).resolve():
        aside = Path(root) / f"abandoned-after-{step_name(resumed)}"
        aside.mkdir(exist_ok=True)
        for folder in later:
            os.rename(folder, aside / folder.name)
        sync_dir(Path(root))
        print(f"resuming at {Path(resume_from).name}: moved the later checkpoints "
              f"{', '.join(p.name for p in later)} to {aside}", flush=True)


def read_meta(folder) -> dict:
    return json.loads((Path(folder) / META_FILE).read_text())


def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the package version."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=source,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "blues " + metadata.version("blues")
    except metadata.PackageNotFoundError:
        return "unknown"


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on the CPU, one entry per tensor storage (tied weights once).

    ZeRO keeps the fp32 master copy partitioned across ranks; `safe_get_full_fp32_param`
    reassembles it with an all-reduce, so every rank must call this.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    masters = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        masters[name] = (param.detach() if full is None else full).float().cpu()
    state, seen = {}, set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = masters.get(name, tensor.detach().cpu()).contiguous()
    return state


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            sync_dir(path)
    sync_dir(folder)


def save(engine, root, step: int, *, config: dict, meta: dict, keep_last: int) -> Path | None:
    """Save step `step` atomically; all ranks call it. Returns the folder on rank 0."""
    import torch.distributed as dist

    root = Path(root)
    rank = dist.get_rank()
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    weights = consolidated_state_dict(engine)
    if rank == 0:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG_FILE, config)
    dist.barrier()
    if rank != 0:
        return None
    fsync_tree(tmp)  # every rank's files are on disk before meta.json marks the folder complete
    write_json_atomic(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta})
    shutil.rmtree(final, ignore_errors=True)  # a stale folder of a run that was rolled back
    os.rename(tmp, final)
    sync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old)
    return final


def deepspeed_load_dir(folder: Path, world_size: int) -> tuple[Path, bool]:
    """Where the engine loads from, and whether that is the universal format.

    Same world size: the folder's own ZeRO shards. Another world size: a universal copy,
    converted by rank 0 on first use (atomically, like a save); all ranks call this.
    """
    import torch.distributed as dist

    if read_meta(folder)["world_size"] == world_size:
        return folder / DEEPSPEED_DIR, False
    universal = folder / UNIVERSAL_DIR
    if dist.get_rank() == 0 and not universal.is_dir():
        convert_to_universal(folder / DEEPSPEED_DIR / DEEPSPEED_TAG, universal)
    dist.barrier()
    return universal, True


def convert_to_universal(shards: Path, universal: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    tmp = universal.with_name(universal.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(shards), output_folder=str(tmp / DEEPSPEED_TAG),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                     strict=True, inject_missing_state=True)
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        ds_to_universal.main(args)
    os.rename(tmp, universal)
