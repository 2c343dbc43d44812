"""The Makefile's data target, run by make itself in a scratch copy of the repository's Makefile."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`make ARGS` in `folder` as a user runs it: not as a sub-make of `make test`, which prints the folders it
    enters and leaves."""
    shutil.copy(REPO / "Makefile", folder / "Makefile")
    (folder / "bench").mkdir(exist_ok=True)
    shutil.copy(REPO / "bench" / "jpg-archive.sh", folder / "bench")  # the layout check of data and gpu-bundle
    # Nor with the variables a `make test VENV=...` line sets, which make exports to the tests.
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "VENV", "CIFAR10_JPG", "ARGS", "DATA_CONFIG", "PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    return subprocess.run(["make", *args], cwd=folder, capture_output=True, text=True, env=env)


def test_data_already_unpacked_needs_no_archive(tmp_path: Path) -> None:
    (tmp_path / "data" / "cifar10-jpg" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cifar10-jpg" / ".unpacked").touch()
    done = make(tmp_path, "data", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "cifar10-jpg" / "train" / "cat").is_dir()


def test_data_without_the_archive_says_which_variable_to_set(tmp_path: Path) -> None:
    done = make(tmp_path, "data", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 2
    assert "make data: no CIFAR-10 JPEG archive at 'missing.tar.gz'; set CIFAR10_JPG=" in done.stdout
    assert "No rule to make target" not in done.stderr
    assert not (tmp_path / "data").exists()  # nothing half-made


def test_data_unpacks_the_archive_whole(tmp_path: Path) -> None:
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "train", arcname="train")
    done = make(tmp_path, "data", "CIFAR10_JPG=images.tar.gz")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "cifar10-jpg" / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
    assert (tmp_path / "data" / "cifar10-jpg" / ".unpacked").exists()
    assert not (tmp_path / "data" / "cifar10-jpg.partial").exists()


def test_gpu_bundle_without_the_archive_says_which_variable_to_set_before_downloading(tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    done = make(tmp_path, "gpu-bundle", "VENV=venv", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 2
    assert "make gpu-bundle: no CIFAR-10 JPEG archive at 'missing.tar.gz'; set CIFAR10_JPG=" in done.stdout
    assert "pip" not in done.stdout and not (tmp_path / "bundle.partial").exists()


def test_bench_without_the_archive_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / ".installed").touch()  # installed after the last change of pyproject.toml
    done = make(tmp_path, "bench", "VENV=venv", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 2
    assert done.stdout == (
        "make bench: no CIFAR-10 JPEG archive at 'missing.tar.gz' and none unpacked in data/cifar10-jpg; "
        "set CIFAR10_JPG=path/to/cifar10-train-jpg.tar.gz\n"
    )


def test_fit_trains_on_the_unpacked_jpeg_copy_without_the_archive(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / ".installed").touch()
    (tmp_path / "data" / "cifar10-jpg").mkdir(parents=True)
    (tmp_path / "data" / "cifar10-jpg" / ".unpacked").touch()
    done = make(tmp_path, "-n", "fit", "VENV=venv", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 0, done.stderr
    assert "venv/bin/cifar-cli fit --config configs/cifar10-jpg.yaml" in done.stdout
    # Neither the copy nor its archive: CIFAR-10 itself, downloaded.
    (tmp_path / "data" / "cifar10-jpg" / ".unpacked").unlink()
    done = make(tmp_path, "-n", "fit", "VENV=venv", "CIFAR10_JPG=missing.tar.gz")
    assert done.returncode == 0, done.stderr
    assert "venv/bin/cifar-cli fit" in done.stdout and "--config" not in done.stdout


def test_clean_removes_what_a_plain_pip_install_builds(tmp_path: Path) -> None:
    """`pip install .` builds in the tree: build/ stayed after `make clean`, with the package's old files in it."""
    (tmp_path / "build" / "lib" / "cifar_cli").mkdir(parents=True)
    (tmp_path / "cifar_cli.egg-info").mkdir()
    (tmp_path / "data" / "cifar10-jpg").mkdir(parents=True)
    done = make(tmp_path, "clean", "VENV=venv")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "build").exists() and not (tmp_path / "cifar_cli.egg-info").exists()
    assert (tmp_path / "data" / "cifar10-jpg").is_dir()  # the unpacked images stay


def test_make_alone_lists_every_target_and_builds_nothing(tmp_path: Path) -> None:
    # It ran the first rule: a .venv made, and nothing said of fit, test or data.
    done = make(tmp_path)
    assert done.returncode == 0, done.stderr
    phony = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith(".PHONY:"))
    listed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("make ")]
    assert sorted(listed) == sorted(set(phony.split()[1:]) - {"help"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "bench"]


def test_data_from_a_damaged_archive_says_so_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.tar.gz").write_text("junk\n")
    done = make(tmp_path, "data", "CIFAR10_JPG=bad.tar.gz")
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1] == (
        "make data: could not unpack 'bad.tar.gz': not a .tar.gz archive, a damaged one, or the disk is full"
    )
    assert "tar:" not in done.stderr and "gzip:" not in done.stderr
    assert not (tmp_path / "data" / "cifar10-jpg.partial").exists()
    assert not (tmp_path / "data" / "cifar10-jpg").exists()


def test_an_archive_path_with_spaces_unpacks_and_trains(tmp_path: Path) -> None:
    # tar was handed the path in pieces: "not a .tar.gz archive, a damaged one", and `make fit` missed the archive.
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    (tmp_path / "my data").mkdir()
    with tarfile.open(tmp_path / "my data" / "images.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "train", arcname="train")
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / ".installed").touch()
    archive_path = "CIFAR10_JPG=my data/images.tar.gz"
    done = make(tmp_path, "-n", "fit", "VENV=venv", archive_path)
    assert done.returncode == 0, done.stderr
    assert "venv/bin/cifar-cli fit --config configs/cifar10-jpg.yaml" in done.stdout
    done = make(tmp_path, "data", archive_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "data" / "cifar10-jpg" / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
    assert make(tmp_path, "data", archive_path).stdout == "make: Nothing to be done for 'data'.\n"
    # A newer archive is unpacked again.
    os.utime(tmp_path / "my data" / "images.tar.gz", (2e9, 2e9))
    assert "tar -xzf" in make(tmp_path, "data", archive_path).stdout


def test_gpu_bundle_copies_an_archive_whose_path_has_spaces(tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / "bin" / "pip").write_text("#!/bin/sh\n")  # the wheels' download, not tried here
    (tmp_path / "venv" / "bin" / "pip").chmod(0o755)
    (tmp_path / "src" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    (tmp_path / "my data").mkdir()
    with tarfile.open(tmp_path / "my data" / "images.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "train", arcname="train")
    done = make(tmp_path, "gpu-bundle", "VENV=venv", "CIFAR10_JPG=my data/images.tar.gz")
    assert done.returncode == 0, done.stdout + done.stderr
    copied = (tmp_path / "bundle" / "cifar10-train-jpg.tar.gz").read_bytes()
    assert copied == (tmp_path / "my data" / "images.tar.gz").read_bytes()
    assert not (tmp_path / "bundle.partial").exists()


def test_data_refuses_an_archive_without_train_and_leaves_nothing(tmp_path: Path) -> None:
    # It was unpacked and marked complete: `make fit` then failed on data/cifar10-jpg, and `make data` with the right
    # archive (older than the mark) did nothing.
    (tmp_path / "src" / "cifar" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cifar" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    with tarfile.open(tmp_path / "nested.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar", arcname="cifar")
    done = make(tmp_path, "data", "CIFAR10_JPG=nested.tar.gz")
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1] == (
        "make data: 'nested.tar.gz' holds no train/ folder: expected train/<class>/<image>.jpg, "
        "as in the CIFAR-10 JPEG copy"
    )
    assert not (tmp_path / "data" / "cifar10-jpg").exists()
    assert not (tmp_path / "data" / "cifar10-jpg.partial").exists()


def test_clean_keeps_a_virtual_environment_outside_the_repository(tmp_path: Path) -> None:
    # `make clean VENV=~/venvs/ml` removed the user's own environment, which make had only installed into.
    (tmp_path / "repo").mkdir()
    (tmp_path / "user-venv" / "bin").mkdir(parents=True)
    (tmp_path / "repo" / "venv" / "bin").mkdir(parents=True)
    done = make(tmp_path / "repo", "clean", f"VENV={tmp_path / 'user-venv'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "user-venv" / "bin").is_dir()
    assert f"make clean: kept {tmp_path / 'user-venv'}, a virtual environment outside the repository" in done.stdout
    done = make(tmp_path / "repo", "clean", "VENV=../user-venv")
    assert done.returncode == 0 and (tmp_path / "user-venv" / "bin").is_dir()
    done = make(tmp_path / "repo", "clean", "VENV=venv")
    assert done.returncode == 0 and not (tmp_path / "repo" / "venv").exists()
    (tmp_path / "repo" / ".venv" / "bin").mkdir(parents=True)
    assert make(tmp_path / "repo", "clean").returncode == 0 and not (tmp_path / "repo" / ".venv").exists()


def test_gpu_bundle_refuses_an_archive_without_train_and_leaves_nothing(tmp_path: Path) -> None:
    # It was copied into bundle/ as it was: the GPU check then failed on the GPU machine, after its start-up.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    (tmp_path / "venv" / "bin" / "pip").write_text("#!/bin/sh\n")  # the wheels' download, not tried here
    (tmp_path / "venv" / "bin" / "pip").chmod(0o755)
    (tmp_path / "src" / "cifar" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cifar" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    with tarfile.open(tmp_path / "nested.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar", arcname="cifar")
    (tmp_path / "bad.tar.gz").write_text("junk\n")
    expected = {
        "nested.tar.gz": "make gpu-bundle: 'nested.tar.gz' holds no train/ folder: expected train/<class>/<image>.jpg, "
        "as in the CIFAR-10 JPEG copy",
        "bad.tar.gz": "make gpu-bundle: could not read 'bad.tar.gz': not a .tar.gz archive, or a damaged one",
    }
    for archive, line in expected.items():
        done = make(tmp_path, "gpu-bundle", "VENV=venv", f"CIFAR10_JPG={archive}")
        assert done.returncode == 2
        assert done.stdout.splitlines() == [line] and "tar:" not in done.stderr and "gzip:" not in done.stderr
        assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.partial").exists()
    # The layout `make data` accepts, listed as tar lists a folder packed as `.`, is bundled.
    with tarfile.open(tmp_path / "dotted.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar", arcname=".")
    done = make(tmp_path, "gpu-bundle", "VENV=venv", "CIFAR10_JPG=dotted.tar.gz")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "bundle" / "cifar10-train-jpg.tar.gz").read_bytes() == (tmp_path / "dotted.tar.gz").read_bytes()
    assert make(tmp_path, "data", "CIFAR10_JPG=dotted.tar.gz").returncode == 0
    assert (tmp_path / "data" / "cifar10-jpg" / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
