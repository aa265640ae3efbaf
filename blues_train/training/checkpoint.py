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

Nothing in a checkpoint runs code: `meta.json` lists the sha256 of every file saved with it
(`files`), checked before a resume or `blues generate` uses the folder, and DeepSpeed's
`.pt` files are read only by weights-only loads (`blues_train.training.weights_only`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from importlib import metadata
from itertools import chain, count
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from blues_train.data.store import file_sha256
from blues_train.io import storage
from blues_train.io.atomic import FILE_MODE, folder_error, os_error, sync_dir, write_json_atomic
from blues_train.io.errors import BluesError
from blues_train.training.deepspeed_import import import_deepspeed

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2  # 2: meta.json lists every file's sha256
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
        storage.read_json(folder / META_FILE)
    except BluesError:
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


def check_start(root, resume_from: Path | None, set_aside: bool, into_existing: bool = False) -> Path | None:
    """Refuse to start from scratch over another run's checkpoints, and to resume another run's
    checkpoint over this folder's own unless `into_existing`; with `set_aside` (rank 0), move
    the checkpoints the resume replaces out of the way (`replaced_by_resume`): they would
    otherwise win `--resume auto` and the keep-last rotation, or be overwritten. Returns the
    folder they went to (None: nothing moved)."""
    found = complete_checkpoints(root)
    if resume_from is None:
        if found:
            raise BluesError(f"{root} already holds checkpoints up to {found[-1].name}: pass "
                             "--resume auto to continue that run, or choose another --out")
        return None
    resumed = read_meta(resume_from)  # the folder may have any name
    replaced = replaced_by_resume(resumed, {p: read_meta(p) for p in found}, root, resume_from, into_existing)
    if not (set_aside and replaced):
        return None
    aside = aside_folder(Path(root), resumed["step"])
    aside.mkdir()
    for folder in replaced:
        os.rename(folder, aside / folder.name)
    sync_dir(Path(root))
    print(f"resuming at {Path(resume_from).name}: moved the checkpoints "
          f"{', '.join(p.name for p in replaced)} to {aside}", flush=True)
    return aside


def run_identity(meta: dict) -> tuple:
    """What makes checkpoints one run's: the mixture trained on and the model."""
    return (meta.get("mixture", {}).get("fingerprint"), meta.get("model_config"))


def replaced_by_resume(resumed: dict, found: dict, root, resume_from, into_existing: bool) -> list:
    """Of the checkpoints `found` ({folder: meta}) in the run folder `root`, those a resume from
    `resumed` (a meta.json) replaces: the later ones, and those of another run. Resuming over
    another run's checkpoints is refused unless `into_existing` (--resume_into_existing)."""
    others = [f for f, meta in found.items() if run_identity(meta) != run_identity(resumed)]
    if others and not into_existing:
        raise BluesError(f"--resume {resume_from}: {root} holds checkpoints of another run (up to "
                         f"{others[-1].name}, another mixture or model): choose another --out, or pass "
                         "--resume_into_existing to continue there (its checkpoints are moved to "
                         f"abandoned-after-{step_name(resumed['step'])}/, not deleted)")
    return [f for f, meta in found.items() if meta["step"] > resumed["step"] or f in others]


def aside_folder(root, step: int):
    """`root/abandoned-after-step-N` (a local or remote folder), or `.2`, `.3`, ... when that is
    taken: nothing set aside earlier is overwritten."""
    base = root / f"abandoned-after-{step_name(step)}"
    numbered = (root / f"{base.name}.{i}" for i in count(2))
    return next(p for p in chain([base], numbered) if not p.exists())


def read_meta(folder) -> dict:
    return storage.read_json(Path(folder) / META_FILE)


def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the package version."""
    source = Path(__file__).resolve().parents[2]
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
    from safetensors.torch import save_file

    root = Path(root)
    rank = dist.get_rank()
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if rank == 0 and final.exists():  # resumes set later checkpoints aside: this is not ours
        raise BluesError(f"{final}: already exists; a run never overwrites a checkpoint: move it away "
                         "or resume from the latest one (--resume auto)")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        weights = consolidated_state_dict(engine)
        if rank == 0:
            save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            os.chmod(tmp / MODEL_FILE, FILE_MODE)  # safetensors creates it private (0600)
            write_json_atomic(tmp / CONFIG_FILE, config)
        dist.barrier()
        if rank != 0:
            return None
        fsync_tree(tmp)  # every rank's files are on disk before meta.json marks the folder complete
        files = file_hashes(tmp)
        write_json_atomic(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta, "files": files})
    except (OSError, RuntimeError, BluesError) as exc:
        reason = os_error(exc, tmp, "saving the checkpoint") if isinstance(exc, OSError) else None
        reason = reason or folder_error(tmp, "saving the checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)  # a .tmp- folder never counts; free its space
        if reason is None:
            raise
        raise reason from None
    os.rename(tmp, final)
    sync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != final:
            shutil.rmtree(old)
    return final


def file_hashes(folder: Path, under: str | None = None) -> dict[str, str]:
    """{relative path: sha256} of the checkpoint's own files (all but meta.json and the
    universal copy), or of the files under `under` (e.g. universal/)."""
    if under is None:
        paths = [p for p in folder.rglob("*") if p.relative_to(folder).parts[0] not in DERIVED]
    else:
        paths = list((folder / under).rglob("*"))
    paths = sorted(p for p in paths if p.is_file())
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = pool.map(file_sha256, paths)
    return {p.relative_to(folder).as_posix(): digest for p, digest in zip(paths, digests)}


DERIVED = (META_FILE, UNIVERSAL_DIR, UNIVERSAL_DIR + ".tmp")


def verify_files(folder) -> None:
    """Refuse a checkpoint any of whose files changed, vanished or appeared since it was
    saved (or, for universal/, since it was converted)."""
    folder = Path(folder)
    meta = read_meta(folder)
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        raise BluesError(f"{folder / META_FILE}: lists no file hashes (format_version "
                         f"{meta.get('format_version')}; Blues writes {FORMAT_VERSION}), so the "
                         "checkpoint cannot be checked: use a checkpoint saved by this Blues")
    compare(folder, recorded, file_hashes(folder))
    if (folder / UNIVERSAL_DIR).exists():
        compare(folder, meta.get("universal_files") or {}, file_hashes(folder, UNIVERSAL_DIR))


def compare(folder: Path, recorded: dict, present: dict) -> None:
    for name in sorted(set(recorded) | set(present)):
        if name not in present:
            raise BluesError(f"{folder / name}: missing; it was saved with the checkpoint "
                             f"({META_FILE} lists it): the checkpoint is incomplete, use another one")
        if name not in recorded:
            raise BluesError(f"{folder / name}: not part of the checkpoint as saved ({META_FILE} "
                             "does not list it): remove it or use another checkpoint")
        if present[name] != recorded[name]:
            raise BluesError(f"{folder / name}: changed since the checkpoint was saved (sha256 "
                             f"{present[name][:16]}, {META_FILE} records {recorded[name][:16]}): "
                             "do not use this checkpoint; restore the file or pick another one")


def load(engine, load_dir: Path) -> None:
    """engine.load_checkpoint, with every .pt read by a weights-only load."""
    from blues_train.training.weights_only import weights_only_loads

    with weights_only_loads():
        engine.load_checkpoint(str(load_dir), tag=DEEPSPEED_TAG)


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
        convert_to_universal(folder)
    dist.barrier()
    return universal, True


def convert_to_universal(folder: Path) -> None:
    """folder/universal/ from folder/deepspeed/, its hashes recorded in meta.json first."""
    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    tmp = folder / (UNIVERSAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(folder / DEEPSPEED_DIR / DEEPSPEED_TAG),
                           output_folder=str(tmp / DEEPSPEED_TAG), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)  # the arguments of its command line
    from blues_train.training.weights_only import weights_only_loads

    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), weights_only_loads():
        ds_to_universal.main(args)
    hashes = file_hashes(folder, tmp.name)
    prefix = tmp.name + "/"
    meta = read_meta(folder)
    meta["universal_files"] = {UNIVERSAL_DIR + "/" + k.removeprefix(prefix): v for k, v in hashes.items()}
    write_json_atomic(folder / META_FILE, meta)
    os.rename(tmp, folder / UNIVERSAL_DIR)
