"""Paths and URIs: the one filesystem layer under every read and write of a user's path.

`storage.path(p)` is how every module turns what a user gave (a flag, a config field, a
mixture's source) into something to read or write: a `pathlib.Path` for a local path or a
`file://` URI, a `RemotePath` for `s3://bucket/prefix` or `gs://bucket/prefix`. A
`RemotePath` has the part of the `Path` interface Blues uses (`/`, `name`, `parent`,
`exists`, `is_file`, `is_dir`, `glob`, `read_bytes`, `read_text`, `open`, `stat`), and no
`__fspath__`, so a bare `open()` of a remote path fails at once instead of writing a local
file named `s3:`.

The remote filesystems are fsspec's (s3fs, gcsfs): they take credentials and endpoints from
the standard chains (for S3 botocore's: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE` and `~/.aws/config`, instance roles, `AWS_ENDPOINT_URL` for S3-compatible
stores), list objects with their ETags, and write conditionally (`If-None-Match`, `If-Match`),
which the writer lease (`folder_lock`) is built on. Local paths keep the fast path: memory
maps, temporary file + fsync + rename (`atomic`).

What object storage promises, and what Blues builds on it: a PUT is atomic (a reader sees
the old object or the whole new one) and S3 is strongly read-after-write consistent (since
2020), also for listings; there is no rename and no append. So every object is written once
under its final name and a folder's commit object (`manifest.json`, `mixture.json`, a
checkpoint's `meta.json`) is written last: a reader trusts only what a committed manifest
lists, with its sha256.

Every failure of the object store becomes one line naming the URI and what to do
(`user_error`): a missing bucket, refused credentials, an unreachable endpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path, PurePosixPath

from blues_train.io.atomic import check_output_folder as check_local_output
from blues_train.io.atomic import os_error, write_atomic
from blues_train.io.errors import BluesError

REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
PACKAGES = {"s3": "s3fs", "gcs": "gcsfs"}
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
READ_BLOCK = 8 << 20  # bytes per ranged GET when streaming an object


def is_uri(given) -> bool:
    return isinstance(given, str) and URI.match(given) is not None


def path(given):
    """A local `Path` (plain path or `file://` URI) or a `RemotePath` (s3://, gs://)."""
    if isinstance(given, (Path, RemotePath)):
        return given
    text = os.fspath(given) if not isinstance(given, str) else given
    match = URI.match(text)
    if match is None:
        return Path(text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return Path(rest or "/")
    if scheme not in REMOTE_SCHEMES:
        raise BluesError(f"{text}: unknown scheme {scheme}://; use a local path, file://, s3:// or gs://")
    if not rest.strip("/"):
        raise BluesError(f"{text}: names no bucket; write {scheme}://BUCKET/PREFIX")
    return RemotePath(scheme, rest)


def is_plain_name(name, subpaths: bool = False) -> bool:
    """A name read from a file that may become a path: not empty, '.' or '..', no '/', no
    backslash, no NUL; with `subpaths` a relative path (`universal/x`) every part of which is so."""
    if not isinstance(name, str):
        return False
    return all(part not in ("", ".", "..") and "/" not in part and "\\" not in part and "\0" not in part
               for part in (name.split("/") if subpaths else (name,)))


def inside(folder, name, entry: str, advice: str, subpaths: bool = False):
    """`folder / name` for a `name` read from a file or a bucket (`entry` says where), refused
    unless it is plain (`is_plain_name`) and, on a local disk, still inside `folder` once
    symbolic links resolve: a name never makes Blues read or write outside its folder."""
    kind = "relative path" if subpaths else "file name"
    if not is_plain_name(name, subpaths):
        raise BluesError(f"{entry} {name!r}: not a {kind} inside {folder} (no '..', '.', empty "
                         f"or absolute parts, no backslash); {advice}")
    target = path(folder) / name
    # A single plain name that is not a symbolic link is inside its folder: only a link (or, with
    # subpaths, a link among the parts) is resolved (a start-up checks thousands of chunk names).
    if isinstance(target, Path) and (subpaths or target.is_symlink()) \
            and not target.resolve().is_relative_to(Path(folder).resolve()):
        raise BluesError(f"{entry} {name!r}: leads outside {folder} through a symbolic link; {advice}")
    return target


def all_inside(folder, named, advice: str) -> None:
    """`inside` for many (name, entry) pairs of one folder, whose symbolic links are listed once
    (a start-up checks thousands of chunk names): only a link, or a name that is not plain, is
    looked at further."""
    links = symbolic_links(folder)
    for name, entry in named:
        if links is None or name in links or not is_plain_name(name):
            inside(folder, name, entry, advice)


def symbolic_links(folder) -> set[str] | None:
    """The names of a local folder's symbolic links (none on object storage); None when the
    folder cannot be listed (each name is then checked alone)."""
    target = path(folder)
    if not isinstance(target, Path):
        return set()
    try:
        with os.scandir(target) as entries:
            return {entry.name for entry in entries if entry.is_symlink()}
    except OSError:
        return None


def is_remote(given) -> bool:
    return isinstance(path(given), RemotePath)


def display(given) -> str:
    """How a path is shown and recorded: a URI as given, a local path absolute."""
    p = path(given)
    return str(p) if isinstance(p, RemotePath) else str(p.resolve())


class RemotePath:
    """An object or a prefix ("folder") in an object store, as `scheme://bucket/key`."""

    __slots__ = ("scheme", "key")

    def __init__(self, scheme: str, key: str):
        self.scheme = scheme.lower()
        self.key = re.sub("/+", "/", key).strip("/")

    # names
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name) -> RemotePath:
        return RemotePath(self.scheme, f"{self.key}/{name}")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.scheme, self.key.rsplit("/", 1)[0]) if "/" in self.key else self

    @property
    def parents(self) -> list[RemotePath]:
        found, p = [], self
        while p.parent != p:
            p = p.parent
            found.append(p)
        return found

    def as_posix(self) -> str:
        return str(self)

    def resolve(self) -> RemotePath:
        return self

    def relative_to(self, other) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(PurePosixPath(path(other).key))

    def is_relative_to(self, other) -> bool:
        other = path(other)
        return isinstance(other, RemotePath) and (self == other or self.key.startswith(other.key + "/"))

    # queries
    @property
    def fs(self):
        return filesystem(self.scheme)

    def exists(self) -> bool:
        return self.entry() is not None

    def is_file(self) -> bool:
        return (self.entry() or {}).get("type") == "file"

    def is_dir(self) -> bool:
        return (self.entry() or {}).get("type") == "directory"

    def entry(self) -> dict | None:
        """fsspec's info on this object or prefix; None only if nothing is there. (fsspec's
        `exists`/`isfile` answer False to any failure: an unreachable endpoint or refused
        credentials would read as missing data.)"""
        with user_errors(self, "reading"):
            try:
                return self.fs.info(self.key)
            except FileNotFoundError:
                return None

    def info(self) -> dict:
        """{"size", "etag"} of the object; FileNotFoundError if there is none."""
        with user_errors(self, "reading"):
            found = self.fs.info(self.key)
        return {"size": int(found.get("size") or 0), "etag": str(found.get("ETag") or found.get("etag") or "")}

    def stat(self):
        return _Stat(self.info()["size"])

    def iterdir(self) -> list[RemotePath]:
        with user_errors(self, "listing"):
            names = self.fs.ls(self.key, detail=False)
        return [RemotePath(self.scheme, name) for name in sorted(names) if name.strip("/") != self.key]

    def glob(self, pattern: str) -> list[RemotePath]:
        with user_errors(self, "listing"):
            found = self.fs.glob(f"{self.key}/{pattern}")
        return [RemotePath(self.scheme, name) for name in sorted(found)]

    # reading
    def open(self, mode: str = "rb", **kwargs):
        if mode not in ("rb", "r"):
            raise ValueError(f"RemotePath.open: mode {mode!r}; write with storage.write_bytes")
        with user_errors(self, "reading"):
            handle = self.fs.open(self.key, "rb", block_size=READ_BLOCK, cache_type="readahead")
        handle = io.BufferedReader(GuardedReader(handle, self), buffer_size=1 << 20)
        return handle if mode == "rb" else io.TextIOWrapper(handle, **kwargs)

    def read_bytes(self) -> bytes:
        with user_errors(self, "reading"):
            return self.fs.cat_file(self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # writing (an object is written whole, once, under its final name)
    def unlink(self, missing_ok: bool = False) -> None:
        with user_errors(self, "deleting"):
            try:
                self.fs.rm_file(self.key)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: nothing to make."""


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class GuardedReader(io.RawIOBase):
    """A remote object's byte stream whose failures are one-line user errors."""

    def __init__(self, handle, where: RemotePath):
        self.handle, self.where = handle, where

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with user_errors(self.where, "reading"):
            data = self.handle.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        with user_errors(self.where, "reading"):
            return self.handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
        super().close()

    @property
    def size(self) -> int:
        return self.handle.size


_FILESYSTEMS: dict[str, object] = {}
_LOCK = threading.Lock()


def filesystem(protocol: str):
    """The fsspec filesystem of `protocol` ("s3", "gcs"), made once per process.

    Listings are not cached (every listing asks the store: a writer in another process
    must be seen); credentials and endpoint come from the provider's standard chain.
    """
    protocol = REMOTE_SCHEMES.get(protocol, protocol)
    pid_key = f"{protocol}:{os.getpid()}"  # not shared with a forked child (its event loop is gone)
    with _LOCK:
        if pid_key not in _FILESYSTEMS:
            try:
                import fsspec

                options = {"use_listings_cache": False, "skip_instance_cache": True}
                if protocol == "s3":
                    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    if endpoint:
                        options["endpoint_url"] = endpoint
                _FILESYSTEMS[pid_key] = fsspec.filesystem(protocol, **options)
            except ImportError:
                raise BluesError(f"{protocol}:// paths need the {PACKAGES[protocol]} package: "
                                 f"pip install {PACKAGES[protocol]} (or pip install -e '.[s3]')") from None
    return _FILESYSTEMS[pid_key]


# The operations every module uses; each takes a local path or a URI.

def read_bytes(given) -> bytes:
    return path(given).read_bytes()


def read_json(given, flag: str = ""):
    """The JSON value of the file or object `given`, for every JSON file Blues reads. Unreadable,
    not UTF-8, not JSON or nested too deep to parse: one line naming it (after `flag`, the flag
    it was given as)."""
    return parse_json(given, read_file(given, flag), flag)


def read_file(given, flag: str = "") -> bytes:
    """The bytes of the file or object `given`; unreadable: one line naming it (after `flag`)."""
    where = f"{flag} {given}".lstrip()
    try:
        return read_bytes(given)
    except FileNotFoundError:
        raise BluesError(f"{where}: not found") from None
    except OSError as exc:
        raise os_error(exc, where, "reading") from None


def parse_json(given, data: bytes, flag: str = ""):
    """`read_json` of the bytes `data` read from `given`."""
    where = f"{flag} {given}".lstrip()
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise BluesError(f"{where}: not valid JSON (nested too deeply to parse)") from None
    except UnicodeDecodeError as exc:
        raise BluesError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise BluesError(f"{where}: not valid JSON ({exc})") from None


def open_input(given):
    """A binary stream of the file or object (the caller closes it)."""
    return path(given).open("rb")


def open_text(given, **kwargs):
    """A text stream of the file or object (`kwargs`: encoding, errors, newline)."""
    p = path(given)
    return p.open("r", **kwargs) if isinstance(p, RemotePath) else open(p, **kwargs)


def write_bytes(given, data: bytes) -> None:
    """Local: temporary name, fsync, rename (a reader sees the old file or the new one).
    Remote: one PUT (atomic on S3 and GCS)."""
    p = path(given)
    if isinstance(p, Path):
        write_atomic(p, data)
        return
    with user_errors(p, "writing"):
        p.fs.pipe_file(p.key, data)


def write_json(given, obj) -> None:
    """`obj` as indented UTF-8 JSON (what `atomic.write_json_atomic` writes), atomically."""
    write_bytes(given, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def upload(local: Path, remote: RemotePath) -> None:
    """A local file to `remote` (multipart for large files; visible only when complete)."""
    with user_errors(remote, "writing"):
        remote.fs.put_file(str(local), remote.key)


def copy(source: RemotePath, target: RemotePath) -> None:
    """An object to another name of the same store, server-side (multipart for large ones)."""
    with user_errors(target, "writing"):
        target.fs.copy(source.key, target.key)


def download(remote: RemotePath, local: Path) -> None:
    """`remote` to `local`, atomically (temporary name, rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    temp = local.with_name(f".{local.name}.{os.getpid()}.part")
    try:
        with user_errors(remote, "reading"):
            remote.fs.get_file(remote.key, str(temp))
        os.replace(temp, local)
    finally:
        temp.unlink(missing_ok=True)


def remove_tree(given) -> None:
    p = path(given)
    with user_errors(p, "deleting"):
        if p.fs.exists(p.key):
            p.fs.rm(p.key, recursive=True)


def sha256(given) -> str:
    digest = hashlib.sha256()
    with open_input(given) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(given, pattern: str = "**") -> list[tuple[str, int, str]]:
    """(URI or path, size, ETag) of every file under `given` matching `pattern`, sorted.

    For sensors: an object's ETag changes whenever it is rewritten. Local files have no
    ETag; theirs is `mtime_ns-size`.
    """
    p = path(given)
    if isinstance(p, Path):
        files = sorted(f for f in p.glob(pattern) if f.is_file()) if p.is_dir() else [p]
        return [(str(f), f.stat().st_size, f"{f.stat().st_mtime_ns}-{f.stat().st_size}") for f in files]
    with user_errors(p, "listing"):
        found = p.fs.glob(f"{p.key}/{pattern}", detail=True) if not p.is_file() else {p.key: p.entry()}
    rows = []
    for name, entry in sorted(found.items()):
        if entry.get("type") == "directory":
            continue
        rows.append((str(RemotePath(p.scheme, name)), int(entry.get("size") or 0),
                     str(entry.get("ETag") or entry.get("etag") or "").strip('"')))
    return rows


# Conditional writes: the primitives of the writer lease. S3 has honoured If-None-Match
# (create only) on PUT since 2024 and If-Match (replace only that version) since late 2024;
# a store that ignores the headers makes these plain PUTs (see folder_lock).

class PreconditionFailed(Exception):
    """A conditional write found another version than the one it was conditioned on."""


def put_if_absent(remote: RemotePath, data: bytes) -> str:
    """Create `remote` only if no object is there; its new ETag. PreconditionFailed if one is."""
    return _conditional_put(remote, data, IfNoneMatch="*")


def put_if_match(remote: RemotePath, data: bytes, etag: str) -> str:
    """Replace `remote` only if it is still the version `etag`; its new ETag."""
    return _conditional_put(remote, data, IfMatch=etag)


def read_with_etag(remote: RemotePath) -> tuple[bytes, str]:
    """An object's bytes and the ETag of exactly that version (s3fs reads with If-Match on
    the ETag it found when opening); FileNotFoundError if there is none."""
    with user_errors(remote, "reading"):
        with remote.fs.open(remote.key, "rb") as fh:
            data = fh.read()
            etag = (getattr(fh, "details", None) or {}).get("ETag") or ""
    return data, str(etag or remote.info()["etag"])


def delete_if_match(remote: RemotePath, etag: str) -> None:
    if remote.scheme != "s3":
        remote.unlink(missing_ok=True)
        return
    try:
        with user_errors(remote, "deleting"):
            remote.fs.call_s3("delete_object", Bucket=remote.bucket, Key=_object_key(remote), IfMatch=etag)
    except (PreconditionFailed, FileNotFoundError):
        pass


def _object_key(remote: RemotePath) -> str:
    return remote.key.split("/", 1)[1] if "/" in remote.key else ""


def _conditional_put(remote: RemotePath, data: bytes, **condition) -> str:
    if remote.scheme != "s3":  # gcsfs has no If-Match on ETags; generations would do (not done)
        with user_errors(remote, "writing"):
            remote.fs.pipe_file(remote.key, data)
        return remote.info()["etag"]
    with user_errors(remote, "writing"):
        reply = remote.fs.call_s3("put_object", Bucket=remote.bucket, Key=_object_key(remote), Body=data,
                                  **condition)
    return str(reply.get("ETag", ""))


# Errors: one line naming the URI, the cause and what to do.

def user_errors(where, action: str):
    return _UserErrors(where, action)


class _UserErrors:
    def __init__(self, where, action: str):
        self.where, self.action = where, action

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (BluesError, PreconditionFailed)):
            return False
        if is_precondition_failure(exc):
            raise PreconditionFailed(str(exc)) from None
        error = user_error(exc, self.where, self.action)
        if error is None:
            return False
        raise error from None


def is_precondition_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return (isinstance(exc, FileExistsError) or "PreconditionFailed" in text
            or "pre-conditions you specified did not hold" in text)


def user_error(exc: BaseException, where, action: str = "accessing") -> BluesError | None:
    """The one-line BluesError for an object store's failure, or None (not one of ours)."""
    where = path(where) if where is not None else None
    if where is not None and not isinstance(where, RemotePath):
        return None
    text = f"{type(exc).__name__}: {exc}"
    bucket = where.bucket if where is not None else "(unknown)"
    where = where if where is not None else "object storage"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    if any(code in text for code in ("NoSuchBucket", "The specified bucket does not exist")):
        return BluesError(f"{where}: bucket {bucket} does not exist ({endpoint}): create it or check the URI")
    if any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                                     "InvalidToken", "AuthorizationHeaderMalformed")):
        return BluesError(f"{where}: the object store refused the credentials ({_code(text)}) while {action}: "
                          "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return BluesError(f"{where}: no credentials found while {action}: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role applies")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return BluesError(f"{where}: access denied while {action} ({_code(text)}): the credentials are "
                          "wrong or may not use this bucket: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                          "or AWS_PROFILE, and the bucket's policy")
    if any(code in text for code in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeout",
                                     "Could not connect", "Cannot connect", "ConnectionRefused")):
        return BluesError(f"{where}: cannot reach the object store at {endpoint} while {action}: check "
                          "AWS_ENDPOINT_URL and the network")
    if isinstance(exc, FileNotFoundError):
        return None  # the caller says what was missing
    if isinstance(exc, OSError) or "ClientError" in text or "botocore" in type(exc).__module__:
        return BluesError(f"{where}: the object store failed while {action} ({_code(text)}); run the same "
                          "command again")
    return None


def is_storage_exception(exc: BaseException) -> bool:
    """An exception of the object-store clients (botocore, aiohttp, s3fs, gcsfs)."""
    module = type(exc).__module__ or ""
    return module.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


def _code(text: str) -> str:
    return text.splitlines()[0][:200]


def check_output_folder(given, flag: str) -> None:
    """Before any work: the output folder can be made and written (`atomic.check_output_folder`),
    or a remote output's bucket exists and these credentials may reach it."""
    p = path(given)
    if not isinstance(p, RemotePath):
        check_local_output(p, flag)
        return
    with user_errors(p, "checking"):
        try:
            if p.scheme == "s3":
                p.fs.call_s3("head_bucket", Bucket=p.bucket)
            else:
                p.fs.ls(p.bucket)
        except FileNotFoundError:
            raise BluesError(f"{flag} {p}: bucket {p.bucket} does not exist: create it or check the URI") from None
    if p.is_file():
        raise BluesError(f"{flag} {p}: is an object, not a prefix (folder)")


def cache_root() -> Path:
    """Where local copies of remote data live: $BLUES_CACHE_DIR, else ~/.cache/blues."""
    given = os.environ.get("BLUES_CACHE_DIR")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blues"
