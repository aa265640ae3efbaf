"""A real S3 protocol on 127.0.0.1 for the tests: moto's standalone server (moto[server]).

s3fs's own test suite runs against the same server. Nothing of Blues is mocked: Blues talks
HTTP to it through s3fs/botocore exactly as it would to AWS, with the endpoint and the
credentials from the standard environment variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY, REGION = "blues-test-key", "blues-test-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server(extra_env: dict | None = None):
    """A moto S3 server; yields its endpoint URL. Stopped (by its pid) on exit."""
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    command = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_env(endpoint: str) -> dict:
    """The standard AWS variables that point botocore (and so s3fs and Blues) at `endpoint`."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true"}


def client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION)


def upload_tree(s3, local: Path, bucket: str, prefix: str) -> None:
    """Every file under `local` to s3://bucket/prefix/<relative path>."""
    for file in sorted(local.rglob("*")):
        if file.is_file():
            s3.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(local).as_posix()}")


class S3:
    """The session's server: its endpoint, a boto3 client, and the environment that reaches it."""

    def __init__(self, endpoint: str):
        self.endpoint, self.client, self.env = endpoint, client(endpoint), s3_env(endpoint)

    def bucket(self, name: str) -> str:
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server for the session, with the standard AWS variables (and BLUES_CACHE_DIR)
    set in this process, so that in-process calls and the commands it starts reach it."""
    from blues_train.io import storage

    with moto_server() as endpoint:
        server = S3(endpoint)
        settings = {**server.env, "BLUES_CACHE_DIR": str(tmp_path_factory.mktemp("blues_cache"))}
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        storage._FILESYSTEMS.clear()
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            storage._FILESYSTEMS.clear()
