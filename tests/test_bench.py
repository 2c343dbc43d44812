"""`make bench` in smoke mode: every part runs end to end on a tiny image folder and fills the table."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from rich.console import Console
from rich.table import Table

from bench.common import cifar_cli, run_process, run_steps
from bench.gpu import run as gpu_check
from bench.run import run
from bench.run import table as bench_table
from bench.scale import PLACEMENTS
from cifar_cli.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_in_process_runs_need_no_python_3_11(tmp_path: Path, monkeypatch) -> None:
    """pyproject admits Python 3.10, whose contextlib lacks `chdir`: the suite's in-process runs of the benchmarks
    (and `make bench`'s tutorial part) stopped there with an AttributeError."""
    import contextlib

    monkeypatch.delattr(contextlib, "chdir", raising=False)
    _, output = cifar_cli(["fit", "--help"], tmp_path / "run", in_process=True)
    assert "--trainer.max_epochs" in output
    assert Path.cwd() == tmp_path  # back where it was


def test_bench_smoke_run_fills_every_row(tmp_path: Path, capsys) -> None:
    # Four classes: the transfer part pretrains on the first half of them, and a classifier needs two.
    write_image_folder(tmp_path / "images" / "train", {"a": 30, "b": 30, "c": 30, "d": 30})
    results = run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), val_size=20, test_size=20, smoke=True)
    printed = capsys.readouterr().out
    a, b, c, d = results["pipeline"], results["overhead"], results["recipe"], results["fast_cpu"]
    assert a["tutorial"] > 0 and a["ours"] > 0 and a["ours_fast"] > 0
    host = results["host"]
    assert host["steps"] == 1 and host["overhead_ms"] == pytest.approx(1000 * (host["cifar_cli"] - host["plain"]))
    assert host["lightning"] > 0 and len(host["lightning_runs"]) == 1
    assert b["steps"] == 1 and b["plain"] > 0 and b["cifar_cli"] > 0
    # Both recipes were tested on the same 20 held-out images: accuracies are multiples of 1/20.
    assert all(abs(acc * 20 - round(acc * 20)) < 1e-4 for acc in (c["tutorial_acc"], c["ours_acc"]))
    assert c["tutorial_fit"] > 0 and c["ours_fit"] > 0
    assert d["epochs"] == 1 and 0 <= d["final_acc"] <= 1 and d["fit_time"] > 0
    f, g = results["decode"], results["placement"]
    assert f["images"] == 24 and f["one_process"] > 0 and f["all_cores"] > 0 and f["npy_bytes"] > 24 * 3 * 48 * 48
    assert g["cache_bytes"] > 0 and all(g[p]["images_per_s"] > 0 and g[p]["peak_rss"] > 0 for p in PLACEMENTS)
    h = results["predict"]
    assert h["images"] == 24 and h["decoded_bytes"] == 24 * 3 * 32 * 32
    assert all(h[run]["seconds"] > 0 and h[run]["peak_rss"] > 0 for run in ("memory", "disk", "disk_again"))
    assert len(list((tmp_path / "bench" / "predict" / "cache").glob("predict-32px-*.npy"))) == 1
    # Transfer: 2 of the 3 classes fine-tuned on 5 images each, tested on 10 each: multiples of 1/20.
    e = results["transfer"]
    assert e["pretrain_epochs"] == 1 and {"scratch_5", "pretrained_5"} <= e.keys()
    assert all(abs(e[k] * 20 - round(e[k] * 20)) < 1e-4 for k in ("scratch_5", "pretrained_5"))
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["recipe"] == c and saved["machine"].startswith("cifar-cli benchmarks:")
    table = (tmp_path / "bench" / "results.txt").read_text()
    for row in (
        "a. data pipeline",
        "b. host time per step",
        "b. Lightning overhead",
        "c. tutorial recipe",
        "fast-cpu.yaml",
        "e. transfer",
        "fine-tuned on the others, 5 images/class",
        "f. decode",
        "g. placement device",
        "placement disk, page cache dropped",
        "h. predict 24 photos at 32 px, in memory",
        "predict on disk again",
    ):
        assert row in table and row in printed


@pytest.mark.slow
def test_gpu_check_smoke_run_fills_every_row(tmp_path: Path, capsys) -> None:
    write_image_folder(tmp_path / "images" / "train", {"a": 40, "b": 40, "c": 40})
    results = gpu_check(root=str(tmp_path / "images"), out=str(tmp_path / "gpu"), smoke=True,
                        results=str(tmp_path / "results"))  # fmt: skip
    printed = capsys.readouterr().out
    tests, recipe, fast, ddp = results["tests"], results["recipe"], results["fast"], results["ddp"]
    # Without a GPU every GPU test is collected and skipped; pytest exits 0.
    assert tests["exit_code"] == 0 and tests["skipped"] >= 4 and "passed" not in tests and "error" not in tests
    assert recipe["images"] == 64 and recipe["tutorial_seconds"] > 0 and recipe["ours_images_per_s"] > 0
    # The one smoke run was tested on the 20 held-out images: its accuracy is a multiple of 1/20.
    assert fast["runs"] == 1 and abs(fast["acc_mean"] * 20 - round(fast["acc_mean"] * 20)) < 1e-4
    assert fast["seconds_mean"] > 0 and fast["startup_mean"] > 0
    assert ddp["devices"] == 1 and ddp["seconds"] > 0
    # airbench94's own code on the same 20 test images, on the CPU here.
    airbench = results["airbench"]
    assert airbench["device"] == "cpu" and airbench["runs"] == 1 and airbench["seconds_mean"] > 0
    assert abs(airbench["acc_mean"] * 20 - round(airbench["acc_mean"] * 20)) < 1e-4
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["fast"] == fast and saved["machine"].startswith("cifar-cli GPU check:")
    table = (tmp_path / "results" / "results.txt").read_text()
    assert "1. fast.yaml, 1 run: test_acc" in table and "same images, 1 run: test_acc" in table  # --smoke: one run
    for row in ("1. fast.yaml", "1b. airbench94's code", "2. tutorial recipe", "3. pytest -m gpu", "4. ddp.yaml"):
        assert row in table and row in printed
    assert printed.index("1. fast.yaml") < printed.index("1b. airbench94") < printed.index("2. tutorial recipe")


def test_some_parts_write_their_own_results_beside_a_whole_runs(tmp_path: Path) -> None:
    """`--parts` wrote results.json and results.txt with only its parts, over a whole run's results."""
    write_image_folder(tmp_path / "images" / "train", {"a": 30, "b": 30})
    out = tmp_path / "bench"
    out.mkdir()
    whole = {"machine": "cifar-cli benchmarks: earlier", "host": {"overhead_ms": 0.6}}
    (out / "results.json").write_text(json.dumps(whole))
    (out / "results.txt").write_text("the whole run's table")
    results = run(root=str(tmp_path / "images"), out=str(out), val_size=10, test_size=10, smoke=True,
                  parts=["pipeline"])  # fmt: skip
    assert json.loads((out / "results.json").read_text()) == whole
    assert (out / "results.txt").read_text() == "the whole run's table"
    saved = json.loads((out / "results-pipeline.json").read_text())
    assert saved["pipeline"] == results["pipeline"] and saved["pipeline"]["ours"] > 0 and "host" not in saved
    assert "a. data pipeline" in (out / "results-pipeline.txt").read_text()


def test_a_failed_step_keeps_its_error_and_the_next_steps_still_run(tmp_path: Path, capsys) -> None:
    def broken() -> dict:
        raise SystemExit("cifar-cli fit failed in runs/x:\nCUDA error: [bad] launch")

    def grid(results: dict) -> Table:
        table = Table()
        table.add_column("step")
        table.add_column("baseline")
        table.add_column("value")
        for key, value in results.items():
            table.add_row(key, "", str(value["n"]))
        return table

    steps = [("one", "1. one", lambda: {"n": 1}), ("two", "2. two", broken), ("three", "3. three", lambda: {"n": 3})]
    with pytest.raises(SystemExit, match=r"^1 of 3 steps failed: 2\. two$"):
        run_steps(steps, {}, tmp_path, grid)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["one"] == {"n": 1} and saved["three"] == {"n": 3}
    assert saved["two"] == {"error": "cifar-cli fit failed in runs/x:\nCUDA error: [bad] launch"}
    table = (tmp_path / "results.txt").read_text()
    assert "failed: cifar-cli fit failed in runs/x:" in table and "three" in table
    assert "CUDA error: [bad] launch" in capsys.readouterr().out  # printed whole, brackets and all


def test_a_process_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    # The process starts a child (as DDP starts its other ranks), notes its pid, then both sleep. The child's
    # output goes elsewhere: it would otherwise hold the pipe open, and reading the output would wait for it.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "open('child.pid', 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(SystemExit, match=r"was still running after 2 s and was killed:\nstarted"):
        run_process([sys.executable, "-c", script], tmp_path, timeout=2)
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is no zombie (a killed orphan may wait to be reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_gpu_check_refuses_a_machine_without_gpu(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match="no CUDA GPU here"):
        gpu_check(root=str(tmp_path), out=str(tmp_path / "gpu"))


def test_bench_refuses_a_folder_without_train(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no train/ folder"):
        run(root=str(tmp_path), out=str(tmp_path / "bench"), smoke=True)


def test_the_table_signs_a_negative_overhead_once() -> None:
    host = {"steps": 10, "plain": 0.02, "lightning": 0.0175, "cifar_cli": 0.025, "plain_runs": [0.02],
            "overhead_ms": 0.5, "lightning_ms": -0.25}  # fmt: skip
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(bench_table({"host": host}, "title"))
    text = console.export_text()
    assert "-0.250 ms" in text and "+0.500 ms" in text and "+-" not in text


@pytest.mark.parametrize("parts", [["pipelin"], []])
def test_bench_refuses_parts_it_does_not_have_before_writing(tmp_path: Path, parts: list[str]) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"^--parts: .*choose from pipeline, host, overhead, recipe, "):
        run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), smoke=True, parts=parts)
    assert not (tmp_path / "bench").exists()


def test_bench_refuses_sizes_the_folder_cannot_hold_in_one_line(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images" / "train", {"a": 5, "b": 5})
    message = r"^val_size/test_size hold out 105 of 10 training images.*choose --val_size \(and --test_size\)"
    with pytest.raises(UsageError, match=message):
        run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), val_size=100, test_size=5, smoke=True)
    assert not (tmp_path / "bench").exists()


def test_bench_refuses_a_train_folder_without_classes_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"train has no class folders"):
        run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), smoke=True)


def test_gpu_check_refuses_a_train_folder_without_classes_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"train has no class folders"):
        gpu_check(root=str(tmp_path / "images"), out=str(tmp_path / "gpu"), smoke=True)
    assert not (tmp_path / "gpu").exists()


@pytest.mark.parametrize(
    "module, args", [("bench.tutorial", []), ("bench.tutorial", ["--help"]), ("bench.steps", ["plain", "data"])]
)
def test_bench_helpers_without_their_arguments_say_their_usage(module: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"usage: python -m {module} ") and "Traceback" not in done.stderr


def test_tutorial_code_refuses_a_missing_arrays_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.tutorial", str(tmp_path / "nope.pt")], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert (
        done.returncode == 1
        and done.stderr
        == f"bench.tutorial: {tmp_path / 'nope.pt'} is not a file (bench/common.py's tutorial_arrays writes one)\n"
    )


@pytest.mark.parametrize(
    "args, error",
    [
        (["--repeats", "0"], 'Parser key "repeats": Not of type PositiveInt: 0 does not conform to restriction v>0'),
        (["--batch", "-4"], 'Parser key "batch": Not of type PositiveInt: -4 does not conform to restriction v>0'),
        (["--device", "gpu0"], "--device: gpu0 is not a torch device (cpu, cuda, cuda:1, ...)"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ],
)
def test_augment_benchmark_refuses_bad_values_in_one_line(args: list[str], error: str) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.augment", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"bench.augment: error: {error}\n", done.stderr


@pytest.mark.parametrize(
    "module, args, key",
    [
        ("bench.gpu", ["--timeout", "-1"], "timeout"),
        ("bench.gpu", ["--runs", "0"], "runs"),
        ("bench.resume_trial", ["--trials", "0"], "trials"),
    ],
)
def test_gpu_and_resume_checks_refuse_counts_below_one_before_running(
    module: str, args: list[str], key: str, tmp_path: Path
) -> None:
    done = subprocess.run([sys.executable, "-m", module, *args, "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and f'Parser key "{key}"' in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "module, args, line",
    [
        ("bench.run", ["--bogus", "1"], "bench: error: unrecognized arguments: --bogus 1"),
        ("bench.gpu", ["--runs", "x"], 'bench-gpu: error: Parser key "runs": Not of type PositiveInt: invalid literal'),
        ("bench.resume_trial", ["--trials", "0"], 'bench-resume: error: Parser key "trials": Not of type PositiveInt'),
        ("bench.run", ["--parts", "[pipelin]"], "bench: error: --parts: no part pipelin; choose from pipeline, host"),
        ("bench.resume_trial", ["--root", "nowhere"], "bench-resume: error: /"),
    ],
)
def test_bench_commands_refuse_a_bad_flag_in_one_line(module: str, args: list[str], line: str) -> None:
    # jsonargparse's usage block and tip came first: five lines to read before the error, under `make bench`.
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(line), done.stderr
    shown = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ") and "--out OUT" in shown.stdout


def test_gpu_offline_script_writes_a_relative_out_dir_where_it_was_started(tmp_path: Path) -> None:
    # "Run from anywhere": the script moves to the repository, and a relative OUT_DIR went there with it. A Python
    # that fails stops it at its first step, after OUT_DIR is made.
    name = f"out-{tmp_path.name}"
    try:
        done = subprocess.run([str(REPO / "bench" / "gpu-offline.sh"), name], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "PYTHON": "false"})  # fmt: skip
        assert done.returncode == 2 and "could not install bundle/wheels" in done.stderr
        assert (tmp_path / name).is_dir() and not (REPO / name).exists()
    finally:
        shutil.rmtree(REPO / name, ignore_errors=True)


def test_gpu_offline_script_without_the_bundle_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "gpu-offline.sh", tmp_path / "bench")
    script = [str(tmp_path / "bench" / "gpu-offline.sh"), str(tmp_path / "out")]
    done = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "PYTHON": "true"})
    assert done.returncode == 2
    assert done.stderr == "gpu-offline: could not install bundle/wheels: no wheels there (run make gpu-bundle first)\n"
    (tmp_path / "bundle" / "wheels").mkdir(parents=True)
    (tmp_path / "bundle" / "wheels" / "jsonargparse-4.53.0-py3-none-any.whl").touch()  # installed by `true`
    done = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "PYTHON": "true"})
    assert done.returncode == 2
    assert done.stderr == "gpu-offline: no bundle/cifar10-train-jpg.tar.gz to unpack (run make gpu-bundle first)\n"
    assert not (tmp_path / "data").exists()


def test_resume_trials_say_why_a_folder_cannot_be_used_in_one_line(tmp_path: Path) -> None:
    # "the reference run failed: see .../output.log" was all it said, after starting a training process.
    from bench.resume_trial import run as resume_trials

    with pytest.raises(UsageError, match=r"nowhere has no train/ folder: run `make data` or pass"):
        resume_trials(root=str(tmp_path / "nowhere"), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^bench-resume: the reference run failed: cifar-cli: error: .*train has no "
                       r"class folders: .*\(see .*output\.log\)$"):  # fmt: skip
        resume_trials(root=str(tmp_path / "images"), out=str(tmp_path / "out"))


class Finished:
    """A `cifar-cli fit` process of bench.resume_trial that has ended, for a `fit` replaced in the test."""

    def wait(self) -> int:
        return 0

    def send_signal(self, signum: int) -> None:
        pass


def test_resume_trials_start_in_fresh_folders_when_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second `make bench-resume` found the first one's last.ckpt in each trial's folder: it counted as a save,
    # the kill could come before the new run had saved, and `--ckpt_path last` then resumed the old finished run.
    import bench.resume_trial as trial

    found = []

    def fit(args: list[str], cwd: Path) -> Finished:
        cwd.mkdir(parents=True, exist_ok=True)
        if "--ckpt_path" not in args:
            found.append(sorted(p.name for p in cwd.rglob("*")))
        checkpoint = cwd / "logs" / "version_0" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"")
        return Finished()

    monkeypatch.setattr(trial, "fit", fit)
    monkeypatch.setattr(trial, "wait_for_saves", lambda process, cwd, saves: None)
    monkeypatch.setattr(trial, "final_state", lambda cwd: {"w": torch.zeros(1)})
    monkeypatch.setattr(trial, "all_loadable", lambda cwd: True)
    monkeypatch.setattr(trial.time, "sleep", lambda seconds: None)
    (tmp_path / "train").mkdir()
    for _ in range(2):
        trial.run(root=str(tmp_path), out=str(tmp_path / "out"), trials=2)
    assert found == [[]] * 6  # reference, trial-0, trial-1, twice: each started in an empty folder


def test_results_are_never_half_written(tmp_path: Path) -> None:
    # A write that fails (a full disk; here a file size limit) or a kill at the device's time limit cut
    # results.json short: the steps measured before were lost with it. Now the last whole version stays.
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from rich.table import Table\n"
        "from bench.common import run_steps\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))\n"
        "steps = [('one', '1', lambda: {'n': 1}), ('two', '2', lambda: {'text': 'x' * 1000})]\n"
        "run_steps(steps, {}, Path(sys.argv[1]), lambda results: Table())\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert json.loads((out / "results.json").read_text()) == {"one": {"n": 1}}
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


@pytest.mark.parametrize(
    "module, args",
    [
        ("bench.run", ["--smoke", "true", "--out"]),
        ("bench.gpu", ["--smoke", "true", "--out"]),
        ("bench.gpu", ["--smoke", "true", "--results"]),
        ("bench.resume_trial", ["--out"]),
    ],
)
def test_bench_commands_refuse_an_output_folder_they_cannot_make_in_one_line(
    module: str, args: list[str], tmp_path: Path
) -> None:
    # A traceback ending in NotADirectoryError (PermissionError in a read-only folder), and bench.run's came only
    # after it had decoded the whole image folder.
    write_image_folder(tmp_path / "images" / "train", {"a": 2, "b": 2})
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", module, "--root", str(tmp_path / "images"), *args,
                           str(tmp_path / "file" / "out")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    prog = {"bench.run": "bench", "bench.gpu": "bench-gpu", "bench.resume_trial": "bench-resume"}[module]
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"{prog}: error: {args[-1]} {tmp_path / 'file' / 'out'}: cannot make a folder there: "
        f"{tmp_path / 'file'} is a file, not a folder\n"
    )
    assert not (tmp_path / "file").read_text() and not list(tmp_path.glob("**/*out*"))


def test_smoke_fits_train_and_validate_a_few_batches_whatever_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make bench ARGS="--smoke true"` pretrained a whole epoch on half the JPEG copy (25,000 images: 3 of its
    # 5 minutes) and part d validated on all 5,000 images; the tiny folders of the tests hid both.
    import bench.run
    import bench.transfer

    fits = []

    def recorded(args: list[str], cwd: Path, **kwargs) -> tuple[float, str]:
        if args[0] == "fit":
            fits.append(args)
        return cifar_cli(args, cwd, **kwargs)

    monkeypatch.setattr(bench.transfer, "cifar_cli", recorded)
    monkeypatch.setattr(bench.run, "cifar_cli", recorded)
    write_image_folder(tmp_path / "images" / "train", {"a": 30, "b": 30, "c": 30, "d": 30})
    run(root=str(tmp_path / "images"), out=str(tmp_path / "bench"), val_size=20, test_size=20, smoke=True,
        parts=["fast_cpu", "transfer"])  # fmt: skip
    assert len(fits) == 4
    for args in fits:
        flags = dict(zip(args[1::2], args[2::2]))  # every flag of these commands takes one value
        assert flags.get("--trainer.limit_train_batches") == "2" and flags.get("--trainer.limit_val_batches") == "2"


def test_resume_trials_that_differ_end_the_command_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "1 of 2 ... ended with exactly the uninterrupted run's weights", and exit code 0: a CI job running
    # `make bench-resume` passed whatever resuming did.
    import bench.resume_trial as trial

    def fit(args: list[str], cwd: Path) -> Finished:
        checkpoint = cwd / "logs" / "version_0" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"")
        return Finished()

    weights = {"reference": 0.0, "trial-0": 0.0, "trial-1": 1.0}
    monkeypatch.setattr(trial, "fit", fit)
    monkeypatch.setattr(trial, "wait_for_saves", lambda process, cwd, saves: None)
    monkeypatch.setattr(trial, "final_state", lambda cwd: {"w": torch.full((1,), weights[cwd.name])})
    monkeypatch.setattr(trial, "all_loadable", lambda cwd: True)
    monkeypatch.setattr(trial.time, "sleep", lambda seconds: None)
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match=r"^bench-resume: 1 of 2 resumed runs did not end with the uninterrupted "
                       r"run's weights \(see .*results\.json\)$"):  # fmt: skip
        trial.run(root=str(tmp_path), out=str(tmp_path / "out"), trials=2)
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["exact"] == 1 and [row["equal"] for row in summary["rows"]] == [True, False]
    weights["trial-1"] = 0.0
    assert trial.run(root=str(tmp_path), out=str(tmp_path / "out"), trials=2)["exact"] == 2


def test_a_trial_that_never_finishes_counts_as_not_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A trial whose resumes all failed before saving a last.ckpt ended `make bench-resume` in a traceback
    # (max() of no checkpoints), without the other trials' rows or results.json.
    import bench.resume_trial as trial

    class Failed(Finished):
        def wait(self) -> int:
            return 1

    def fit(args: list[str], cwd: Path) -> Finished:
        if cwd.name == "reference":
            checkpoint = cwd / "logs" / "version_0" / "checkpoints" / "last.ckpt"
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.write_bytes(b"")
            return Finished()
        return Failed()

    monkeypatch.setattr(trial, "fit", fit)
    monkeypatch.setattr(trial, "wait_for_saves", lambda process, cwd, saves: None)
    monkeypatch.setattr(trial, "all_loadable", lambda cwd: True)
    monkeypatch.setattr(trial.time, "sleep", lambda seconds: None)
    real = trial.final_state  # a trial's: none to read
    monkeypatch.setattr(
        trial, "final_state", lambda cwd: {"w": torch.zeros(1)} if cwd.name == "reference" else real(cwd)
    )
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match=r"^bench-resume: 1 of 1 resumed runs did not end"):
        trial.run(root=str(tmp_path), out=str(tmp_path / "out"), trials=1)
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["resumes"] == 4 and row["finished"] is False and row["equal"] is False


def test_a_smoke_run_leaves_a_whole_runs_results_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `make bench ARGS="--smoke true"` after a 30-minute `make bench` replaced its results.json and results.txt
    # with the smoke run's numbers, and its runs' logs with the smoke runs'.
    import bench.gpu

    write_image_folder(tmp_path / "images" / "train", {"a": 30, "b": 30})
    monkeypatch.chdir(tmp_path)
    whole = tmp_path / "runs" / "bench" / "results-pipeline.json"
    whole.parent.mkdir(parents=True)
    whole.write_text("{}")
    run(root="images", val_size=10, test_size=10, smoke=True, parts=["pipeline"])
    assert whole.read_text() == "{}"
    assert json.loads((tmp_path / "runs" / "bench-smoke" / "results-pipeline.json").read_text())["pipeline"]
    folders = []
    monkeypatch.setattr(bench.gpu, "run_steps", lambda steps, measured, results, table: folders.append(results))
    gpu_check(root="images", smoke=True)
    assert folders == [tmp_path / "runs" / "bench-gpu-smoke"]


def test_gpu_offline_script_removes_its_installed_wheels(tmp_path: Path) -> None:
    # Each run left a folder of installed wheels in /tmp, also when it stopped at a missing archive.
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO / "bench" / "gpu-offline.sh", tmp_path / "bench")
    (tmp_path / "bundle" / "wheels").mkdir(parents=True)
    (tmp_path / "bundle" / "wheels" / "jsonargparse-4.53.0-py3-none-any.whl").touch()  # installed by `true`
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHON": "true", "TMPDIR": str(tmp_path / "tmp")}
    done = subprocess.run([str(tmp_path / "bench" / "gpu-offline.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == 2 and "no bundle/cifar10-train-jpg.tar.gz" in done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_gpu_offline_script_checks_the_data_s_layout_before_any_step(tmp_path: Path) -> None:
    # An archive of another layout was unpacked and marked as the JPEG copy: the GPU check's first step failed on it,
    # on the GPU machine, after its start-up.
    (tmp_path / "bench").mkdir()
    for script in ("gpu-offline.sh", "jpg-archive.sh"):
        shutil.copy(REPO / "bench" / script, tmp_path / "bench")
    (tmp_path / "bundle" / "wheels").mkdir(parents=True)
    (tmp_path / "bundle" / "wheels" / "jsonargparse-4.53.0-py3-none-any.whl").touch()  # installed by `true`
    (tmp_path / "src" / "cifar" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cifar" / "train" / "cat" / "0.jpg").write_bytes(b"jpeg")
    with tarfile.open(tmp_path / "bundle" / "cifar10-train-jpg.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar", arcname="cifar")
    script = [str(tmp_path / "bench" / "gpu-offline.sh"), str(tmp_path / "out")]
    done = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "PYTHON": "true"})
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "gpu-offline: 'bundle/cifar10-train-jpg.tar.gz' holds no train/ folder: expected train/<class>/<image>.jpg, "
        "as in the CIFAR-10 JPEG copy"
    )
    assert "tar:" not in done.stderr and "gzip:" not in done.stderr
    assert not (tmp_path / "data" / "cifar10-jpg").exists() and not (tmp_path / "data" / "cifar10-jpg.partial").exists()
    assert not (tmp_path / "out" / "log.txt").exists()  # no step started
    # A folder marked unpacked that lacks train/ (unpacked by hand, or by an earlier script) is refused as well.
    (tmp_path / "data" / "cifar10-jpg" / "cifar").mkdir(parents=True)
    (tmp_path / "data" / "cifar10-jpg" / ".unpacked").touch()
    done = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "PYTHON": "true"})
    assert done.returncode == 2
    assert done.stderr == (
        "gpu-offline: data/cifar10-jpg holds no train/ folder: expected train/<class>/<image>.jpg, as in the "
        "CIFAR-10 JPEG copy (remove data/cifar10-jpg to unpack bundle/cifar10-train-jpg.tar.gz again)\n"
    )
    assert not (tmp_path / "out" / "log.txt").exists()
    # The right archive is unpacked, and the check runs.
    shutil.rmtree(tmp_path / "data")
    with tarfile.open(tmp_path / "bundle" / "cifar10-train-jpg.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar" / "train", arcname="train")
    done = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "PYTHON": "true"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "cifar10-jpg" / "train" / "cat" / "0.jpg").read_bytes() == b"jpeg"
    assert (tmp_path / "data" / "cifar10-jpg" / ".unpacked").exists() and (tmp_path / "out" / "log.txt").exists()


def test_tutorial_code_trains_on_one_gpu_as_its_gpus_1_did(tmp_path: Path, monkeypatch) -> None:
    """The tutorial's `gpus=1` is one GPU: the accelerator found with Lightning's default devices ("auto") took every
    GPU of a machine with several, DDP against the one-GPU epoch the GPU check compares cifar-cli's with."""
    import lightning.pytorch as pl
    from lightning.fabric.accelerators import cuda as fabric_cuda
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.accelerators import cuda as pytorch_cuda

    from bench import tutorial

    # Lightning's view of a machine with 4 GPUs
    for module in (fabric_cuda, pytorch_cuda):
        monkeypatch.setattr(module, "num_cuda_devices", lambda: 4)
    monkeypatch.setattr(fabric_cuda, "_get_all_visible_cuda_devices", lambda: [0, 1, 2, 3])
    built: list[pl.Trainer] = []

    def fit(trainer: pl.Trainer, *args, **kwargs) -> None:
        built.append(trainer)
        raise KeyboardInterrupt  # (no GPU here to train on)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8).numpy()
    torch.save({"train_images": images, "train_labels": [i % 10 for i in range(40)], "test_images": images[:10],
                "test_labels": list(range(10))}, tmp_path / "arrays.pt")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        tutorial.main(str(tmp_path / "arrays.pt"), 1, 10, 2)
    (trainer,) = built
    assert trainer.accelerator.__class__ is CUDAAccelerator and trainer.num_devices == 1
