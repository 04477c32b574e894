"""Artifact store throughput: upload and download of one large file (a model's weights, 500 MB by default)
through the S3 store against a real SeaweedFS on this machine, beside `cp` of the same file, in one run.

Uploads stream (multipart past 8 MiB) and hash as they read, so the process must not grow with the file:
the peak resident-memory growth during each transfer is printed too. Target: store/cp >= 0.5 both ways.
Not a test: `make bench-store` (`ARGS="--size-mb 2000 --rounds 5"`)."""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.settings import Settings  # noqa: E402
from models.storage import open_store  # noqa: E402
from tests.seaweedfs import seaweedfs  # noqa: E402

_CHUNK = 1 << 20


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@contextmanager
def peak_growth() -> Iterator[list[int]]:
    """Samples this process's resident memory every 5 ms; yields a list that ends holding the peak growth."""
    baseline, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_bytes() - baseline)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], resident_bytes() - baseline)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for offset in range(0, size, _CHUNK):
            chunk = os.urandom(min(_CHUNK, size - offset))
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are compared")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    size = args.size_mb * 1_000_000
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="store-bench-") as scratch:
        root = Path(scratch)
        source, copied, downloaded = root / "model.safetensors", root / "copy", root / "download"
        print(f"writing {args.size_mb} MB of random bytes...", flush=True)
        expected = write_random(source, size)
        (root / "seaweedfs").mkdir()
        with seaweedfs(root / "seaweedfs") as server:
            os.environ |= {
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            settings = Settings(
                data_dir=root / "data",
                storage_url=f"s3://{server.bucket}/bench",
                s3_endpoint_url=server.endpoint_url,
            )
            store = open_store(settings)
            cp, upload, download, upload_peak, download_peak = [], [], [], 0, 0
            for round_ in range(args.rounds):
                cp.append(timed(lambda: subprocess.run(["cp", source, copied], check=True)))
                copied.unlink()
                with peak_growth() as peak, open(source, "rb") as stream:
                    started = time.perf_counter()
                    stored_size, stored_sha = store.put_stream(f"models/round-{round_}", stream)
                    upload.append(time.perf_counter() - started)
                upload_peak = max(upload_peak, peak[0])
                assert (stored_size, stored_sha) == (size, expected), "the upload's size or hash is wrong"
                with peak_growth() as peak, store.open(f"models/round-{round_}") as body:
                    started = time.perf_counter()
                    with open(downloaded, "wb") as out:
                        shutil.copyfileobj(body, out, _CHUNK)
                    download.append(time.perf_counter() - started)
                download_peak = max(download_peak, peak[0])
                assert sha256_of(downloaded) == expected, "the download differs from the upload"
                downloaded.unlink()
                store.delete(f"models/round-{round_}")
                mb_s = [size / 1e6 / seconds for seconds in (cp[-1], upload[-1], download[-1])]
                print(
                    f"round {round_ + 1}: cp {mb_s[0]:.0f} MB/s, upload {mb_s[1]:.0f} MB/s, "
                    f"download {mb_s[2]:.0f} MB/s",
                    flush=True,
                )
    load = os.getloadavg()[0]
    cp_s, up_s, down_s = (statistics.median(times) for times in (cp, upload, download))
    print(
        f"store_throughput size={args.size_mb}MB rounds={args.rounds} load1={load:.1f} cpus={os.cpu_count()} "
        f"cp={size / 1e6 / cp_s:.0f}MB/s upload={size / 1e6 / up_s:.0f}MB/s "
        f"download={size / 1e6 / down_s:.0f}MB/s "
        f"upload/cp={cp_s / up_s:.2f}x download/cp={cp_s / down_s:.2f}x "
        f"(target >= 0.5x) peak_rss_growth upload={upload_peak / 2**20:.0f}MiB "
        f"download={download_peak / 2**20:.0f}MiB"
    )


if __name__ == "__main__":
    main()
