"""Shared pytest fixtures.

* ``shared_data`` — the real offline data folder (``$OPENWORLD_SHARED_DATA``, else ``../shared/data``
  next to the repository); tests that need it are skipped with the reason when it is absent.
* ``cifar10_jpeg_root`` — ``cifar10-jpeg.tar.gz`` of the shared folder extracted once per test session;
  the returned folder holds ``cifar10/{train,test}/<class>/*.jpg`` (60,000 files: used by slow tests).
* ``cifar10_jpeg_subset`` — the same layout with only the first 20 files (sorted by name) of every
  split/class folder, for fast tests.
* ``openworld_cache`` — a per-session cache folder; ``isolated_cache`` points ``$OPENWORLD_CACHE`` at it
  for one test, so tests never write into the user's ``~/.cache/openworld``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared data folder if it exists, else None."""
    env = os.environ.get("OPENWORLD_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return path.resolve() if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        where = os.environ.get("OPENWORLD_SHARED_DATA") or str(REPO_ROOT.parent / "shared" / "data")
        pytest.skip(
            f"real-data test: the shared data folder {where} is absent "
            "(set OPENWORLD_SHARED_DATA to a folder laid out as shared/data/README.md describes)"
        )
    return path


@pytest.fixture(scope="session")
def cifar10_jpeg_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    archive = shared_data / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real-data test: {archive} is absent")
    out = tmp_path_factory.mktemp("cifar10_jpeg")
    tar = shutil.which("tar")
    if tar is not None:  # several times faster than tarfile for 60,000 small members
        subprocess.run([tar, "-xzf", str(archive), "-C", str(out)], check=True)
    else:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(out, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tf.extractall(out)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 60,000 files: do not leave them to pytest's later clean-ups


@pytest.fixture(scope="session")
def cifar10_jpeg_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = shared_data / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real-data test: {archive} is absent")
    out = tmp_path_factory.mktemp("cifar10_jpeg_subset")
    folders: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive) as tf:  # one sequential pass (seeking back in a .gz stream is slow)
        for m in tf:
            f = tf.extractfile(m) if m.isfile() else None
            if f is not None:
                folder, _, name = m.name.rpartition("/")
                folders.setdefault(folder, {})[name] = f.read()
    for folder, files in folders.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name in sorted(files)[:20]:
            (out / folder / name).write_bytes(files[name])
    return out


@pytest.fixture(scope="session")
def openworld_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openworld_cache")


@pytest.fixture
def isolated_cache(openworld_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPENWORLD_CACHE", str(openworld_cache))
    return openworld_cache
