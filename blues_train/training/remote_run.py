"""A run folder on object storage (`blues train --out s3://bucket/run`).

Training writes exactly what it writes locally, into a *staging* folder on this host
(`$BLUES_CACHE_DIR/runs/<scheme>/<bucket>/<prefix>`, a cache: the bucket is the truth), so
checkpoints keep their local atomic save (temporary folder, fsync, rename). After each save
rank 0 uploads the checkpoint folder: it renews its writer lease first (a writer whose lease
was taken over writes nothing), uploads the files under a prefix of its own
(`checkpoints/.upload-<writer>/step-N/`, which no other writer uses or commits), renews the
lease again, copies them (server-side) to their final names and commits by putting
`meta.json` only if none is there (`If-None-Match`): a checkpoint on the bucket exists once
its `meta.json` does, its files are the ones `meta.json` lists with their sha256, and a
checkpoint another writer committed is never written over. What remains open is the lease's
own limit (folder_lock): a writer paused for longer than the lease between its renewal and
its copies. `metrics.jsonl` and `tensorboard/` follow. The
last `--keep_last` are kept on the bucket too (an older one is removed meta.json first, so
a half-removed checkpoint is never taken for a complete one).

Before the first step, rank 0 (holding the folder's writer lease) empties the staging folder
and pulls what the run needs: for `--resume auto` the latest committed checkpoint under
`OUT/checkpoints/` and `metrics.jsonl`; for `--resume s3://…/step-N` that folder, and the
checkpoints of OUT that it replaces (later ones; another run's only with
`--resume_into_existing`) move to `checkpoints/abandoned-after-step-N/` with a copy of
`metrics.jsonl`, as locally (checkpoint.check_start). The pulled files are checked against
meta.json like any checkpoint before use. Other ranks on the same
host wait for rank 0 to finish staging.

`fetch_model(uri)` is what `blues generate` uses: only `model.safetensors`, `config.json` and
`meta.json` of the latest committed checkpoint (or of the one named), each checked against the
sha256 meta.json records, into a content-addressed local folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blues_train.data.store import file_sha256
from blues_train.io import storage
from blues_train.io.errors import BluesError
from blues_train.training import checkpoint

META_FILE, MODEL_FILE, CONFIG_FILE = "meta.json", "model.safetensors", "config.json"
STEP_NAME = re.compile(r"^step-(\d+)$")
STAGED = ".staged"
LOGS = ("metrics.jsonl",)
UPLOAD_THREADS = 4
STAGE_WAIT_S = 1800


def staging_folder(remote) -> Path:
    remote = storage.path(remote)
    return storage.inside(storage.cache_root() / "runs" / remote.scheme, remote.key, "--out",
                          "name the run folder without '.' or '..' parts", subpaths=True)


def committed_checkpoints(root) -> list:
    """The committed `step-N` folders (their meta.json exists) under the remote `root`, oldest first."""
    root = storage.path(root)
    found = []
    for uri, _, _ in storage.list_files(root, "step-*/" + META_FILE):
        folder = storage.path(uri).parent
        match = STEP_NAME.match(folder.name)
        if match and folder.parent == root:
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def launch_token() -> str:
    """What the ranks of one launch share (the rendezvous address), to tell a fresh staging mark."""
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{os.getppid()}"


class RemoteRun:
    """The staging folder of a remote run folder, and its uploads."""

    def __init__(self, out):
        self.remote = storage.path(out)
        self.local = staging_folder(self.remote)
        self.checkpoints = self.remote / "checkpoints"
        self.uploads = self.checkpoints / f".upload-{uuid.uuid4().hex[:16]}"  # this writer's own prefix

    def stage(self, resume: str | None, into_existing: bool = False) -> str | None:
        """Rank 0, holding the lease: an empty staging folder with what `resume` needs; the
        `--resume` to use locally (a remote step-N folder becomes its local copy)."""
        storage.check_output_folder(self.remote, "--out")
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        found = committed_checkpoints(self.checkpoints)
        local_resume = resume
        if resume == "auto":
            if found:
                self.pull_checkpoint(found[-1], self.local / "checkpoints" / found[-1].name)
        elif resume:
            source = storage.path(resume)
            if not storage.is_remote(source):
                raise BluesError(f"--resume {resume}: with a remote --out, resume from one of its checkpoints "
                                 f"({self.checkpoints}/step-N) or 'auto'")
            if not (source / META_FILE).is_file():
                raise BluesError(f"--resume {resume}: not a committed checkpoint (it has no {META_FILE}); "
                                 "pass a step-N folder or 'auto'")
            local_resume = str(self.pull_checkpoint(source, Path(self.local_resume(resume))))
            self.set_aside_replaced(source, found, into_existing)
        elif found:
            raise BluesError(f"{self.checkpoints} already holds checkpoints up to {found[-1].name}: pass "
                             "--resume auto to continue that run, or choose another --out")
        if resume:
            for name in LOGS:
                if (self.remote / name).is_file():
                    storage.download(self.remote / name, self.local / name)
        (self.local / STAGED).write_text(launch_token())
        return local_resume

    def set_aside_replaced(self, source, found: list, into_existing: bool) -> None:
        """Resuming from `source`: the checkpoints of OUT it replaces go to
        `checkpoints/abandoned-after-step-N/` with a copy of metrics.jsonl (as locally), so
        that they win neither `--resume auto` nor the keep-last rotation, and are never
        written over."""
        resumed = read_meta(source)
        replaced = checkpoint.replaced_by_resume(resumed, {f: read_meta(f) for f in found}, self.checkpoints,
                                                 source, into_existing)
        if not replaced:
            return
        aside = checkpoint.aside_folder(self.checkpoints, resumed["step"])
        for name in LOGS:
            if (self.remote / name).is_file():
                storage.copy(self.remote / name, aside / name)
        for folder in replaced:
            with storage.user_errors(folder, "moving"):
                (folder / META_FILE).fs.mv(folder.key, (aside / folder.name).key, recursive=True)
        print(f"resuming at {source.name}: moved the checkpoints "
              f"{', '.join(f.name for f in replaced)} to {aside}", flush=True)

    def local_resume(self, resume: str | None) -> str | None:
        """The `--resume` of the staged run (what `stage` returns, for the other ranks)."""
        if resume and resume != "auto":
            return str(storage.inside(self.local / "checkpoints", storage.path(resume).name, "--resume",
                                      "pass a step-N folder or 'auto'"))
        return resume

    def wait_staged(self) -> None:
        """Ranks other than 0: until rank 0 of this launch has staged the folder."""
        deadline = time.monotonic() + STAGE_WAIT_S
        mark = self.local / STAGED
        while not (mark.is_file() and mark.read_text() == launch_token()):
            if time.monotonic() > deadline:
                raise BluesError(f"{self.local}: rank 0 did not stage the run folder within {STAGE_WAIT_S} s")
            time.sleep(0.5)

    def pull_checkpoint(self, source, target: Path) -> Path:
        """Download the committed checkpoint `source` into `target` (meta.json last, then renamed
        into place); its files are checked against meta.json by whoever uses it."""
        meta = read_meta(source)
        names = sorted({*meta.get("files", {}), *meta.get("universal_files", {})})
        temp = target.with_name(f".tmp-{target.name}")
        shutil.rmtree(temp, ignore_errors=True)
        files = [storage.inside(temp, name, f"{source / META_FILE}: files", "use another checkpoint", subpaths=True)
                 for name in names]
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda name, file: storage.download(source / name, file), names, files))
        storage.download(source / META_FILE, temp / META_FILE)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(temp, target)
        return target

    def push_checkpoint(self, folder: Path, keep_last: int) -> None:
        """Upload the local checkpoint `folder` (see the module's docstring), then the logs; keep
        the last `keep_last` checkpoints on the bucket."""
        from blues_train.io.folder_lock import renew_held

        target, staged = self.checkpoints / folder.name, self.uploads / folder.name
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        names.remove(META_FILE)
        renew_held(self.remote)  # before the first byte
        self.refuse_committed(target)
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(lambda name: storage.upload(folder / name, staged / name), names))
            renew_held(self.remote)
            self.refuse_committed(target)
            list(pool.map(lambda name: storage.copy(staged / name, target / name), names))
        try:
            storage.put_if_absent(target / META_FILE, (folder / META_FILE).read_bytes())
        except storage.PreconditionFailed:
            raise self.committed_by_another(target) from None
        storage.remove_tree(staged)
        self.push_logs()
        for old in committed_checkpoints(self.checkpoints)[:-keep_last]:
            if old != target:
                (old / META_FILE).unlink(missing_ok=True)  # uncommitted first
                storage.remove_tree(old)

    def refuse_committed(self, target) -> None:
        """Stop if `target` holds a committed checkpoint: another writer's, never written over."""
        if (target / META_FILE).exists():
            raise self.committed_by_another(target)

    def committed_by_another(self, target) -> BluesError:
        return BluesError(f"{target}: another writer committed this checkpoint meanwhile; nothing of it "
                          f"was overwritten: find who writes {self.remote}, then resume (--resume auto)")

    def push_logs(self) -> None:
        from blues_train.io.folder_lock import renew_held

        renew_held(self.remote)
        for name in LOGS:
            if (self.local / name).is_file():
                storage.upload(self.local / name, self.remote / name)
        board = self.local / "tensorboard"
        for p in sorted(board.rglob("*")) if board.is_dir() else []:
            if p.is_file():
                storage.upload(p, self.remote / p.relative_to(self.local).as_posix())


def read_meta(folder) -> dict:
    """The meta.json of the remote checkpoint `folder`, its file lists JSON objects."""
    try:
        meta = json.loads((folder / META_FILE).read_bytes())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not (isinstance(meta, dict) and all(isinstance(meta.get(key, {}), dict) for key in ("files", "universal_files"))):
        raise BluesError(f"{folder / META_FILE}: not the meta.json of a checkpoint (a JSON object listing its "
                         "files); use another checkpoint")
    return meta


def fetch_model(given) -> Path:
    """A local folder with the model.safetensors, config.json and meta.json of the remote
    checkpoint `given` (a step-N folder, a run folder or its checkpoints/), each file checked
    against the sha256 meta.json records."""
    given = storage.path(given)
    if (given / META_FILE).is_file():
        folder = given
    else:
        found = committed_checkpoints(given / "checkpoints") or committed_checkpoints(given)
        if not found:
            raise BluesError(f"--checkpoint {given}: holds no committed checkpoint (a step-N folder with "
                             f"{META_FILE}); train first (blues train) or pass another URI")
        folder = found[-1]
    recorded = read_meta(folder).get("files", {})
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in recorded:
            raise BluesError(f"{folder / META_FILE}: lists no {name}; use a checkpoint saved by this Blues")
    listed = {storage.path(uri).relative_to(folder).as_posix() for uri, _, _ in storage.list_files(folder)}
    for name in sorted((set(recorded) | {META_FILE}) ^ listed):
        where = "missing (meta.json lists it)" if name not in listed else "not part of the checkpoint as saved"
        raise BluesError(f"{folder / name}: {where}: the checkpoint is incomplete or changed, use another one")
    local = storage.inside(storage.cache_root() / "checkpoints", recorded[MODEL_FILE][:32],
                           f"{folder / META_FILE}: the sha256 of {MODEL_FILE}", "use another checkpoint")
    for name in (MODEL_FILE, CONFIG_FILE):
        path = local / name
        if not (path.is_file() and file_sha256(path) == recorded[name]):
            storage.download(folder / name, path)
            if file_sha256(path) != recorded[name]:
                path.unlink()
                raise BluesError(f"{folder / name}: changed since the checkpoint was saved (its sha256 is "
                                 f"not the one {META_FILE} records): do not use this checkpoint")
    return local  # without meta.json: its other files (DeepSpeed's state) are not here
