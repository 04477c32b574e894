"""What a server command creates under the data directory is its user's alone (security finding 11):
the data directory 0700 and the SQLite database 0600, whatever umask the command was started with."""

import os
import stat
import subprocess
import sys
from pathlib import Path


def test_the_data_directory_and_database_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "--org", "acme", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env={name: value for name, value in os.environ.items() if not name.startswith("FTJOBS_")},
        preexec_fn=lambda: os.umask(0o022),  # the usual umask: world-readable files
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    modes = {path.relative_to(data).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in data.rglob("*")}
    assert modes["ftjobs.db"] == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
