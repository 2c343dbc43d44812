"""DDP under faults, two CPU processes with gloo: a failing rank is named and ends the run; two nodes train as one.

Every run is the `cifar-cli` command in its own process group with a timeout, so a hang fails the test instead of
blocking the suite. OMP_NUM_THREADS=1 everywhere: Lightning otherwise gives each process cores / processes-per-node
threads, 1 on one node of two processes but 2 on each of two one-process nodes, and a different thread count may
sum a convolution's gradient in another order.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from wandb_offline import OfflineRun, read_run, records

from cifar_cli.entry import STAGES

# One pytest worker runs every DDP test (make test: --dist loadgroup): two of them side by side would share the
# 2 cores four ways and run past their timeouts.
pytestmark = pytest.mark.xdist_group("ddp")
CLI = str(Path(sys.executable).parent / "cifar-cli")
# 90 training images over 2 ranks, 5 a batch: 9 steps an epoch, 18 in all.
STEPS = 18
BASE = [
    "fit", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "2",
    "--data", "ImageFolderDataModule", "--data.val_size", "30", "--data.batch_size", "5", "--data.cache_dir", "cache",
]  # fmt: skip
TRAIN = [
    *BASE,
    # A checkpoint every 3 steps, all kept: a mid-epoch one to resume from, and the weights after the last step.
    "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", "steps",
    "--trainer.callbacks.every_n_train_steps", "3", "--trainer.callbacks.save_top_k", "-1",
    "--trainer.log_every_n_steps", "2",
]  # fmt: skip
ONE_NODE = ["--trainer.devices", "2"]
TWO_NODES = ["--trainer.devices", "1", "--trainer.num_nodes", "2"]
TIMEOUT_S = 240  # a DDP run here takes 15 to 40 s, most of it two interpreters importing torch and Lightning


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_env(port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")}
    tests = str(Path(__file__).parent)  # faults.py, for --trainer.callbacks+=faults.FailOnRank
    # The code beside these tests: the `cifar-cli` command imports the checkout it was installed from, and a
    # relative entry (`PYTHONPATH=.`) reads from the run's folder; a clone's DDP tests ran the installed code.
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, repo, env.get("PYTHONPATH")]))
    return {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra}


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    # A session of its own, so that a timeout ends the launched ranks too.
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([CLI, *args], cwd=cwd, env=env, start_new_session=True, **pipes)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Return code and stderr; the test fails, and the whole process group is killed, if it runs past `timeout`."""
    code, _, stderr = finish_with_output(proc, timeout)
    return code, stderr


def finish_with_output(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str, str]:
    """`finish`, with stdout too."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"cifar-cli still running after {timeout:.0f} s; stderr ends:\n{stderr[-2000:]}")
    return proc.returncode, stdout, stderr


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cifar-cli: error: ")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(path: Path, reference: Path) -> None:
    ours, theirs = weights(path), weights(reference)
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{path} differs from {reference} in {differ}"


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp") / "images"
    write_image_folder(root / "train", {"cat": 40, "dog": 40, "frog": 40})
    return root


@pytest.fixture(scope="session")
def uninterrupted(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run the others must match: one node, two processes, 18 steps (each rank takes its own 45 of the 90
    training images: 9 steps of 5 an epoch, where one process would take 18); its folder, with steps/*.ckpt."""
    run = tmp_path_factory.mktemp("one-node")
    code, stderr = finish(start([*TRAIN, *ONE_NODE, "--data.root", str(images)], run, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    assert sorted(p.name for p in (run / "steps").glob("*.ckpt"))[-1] == f"epoch=1-step={STEPS}.ckpt"
    # The confusion matrix counts each of the 30 validation images once, 15 from each rank, and the mistakes
    # gathered from both ranks are exactly the matrix's off-diagonal images.
    with open(run / "confusion_val.csv", newline="") as file:
        counts = torch.tensor([[int(x) for x in row[1:]] for row in list(csv.reader(file))[1:]])
    mistakes = torch.load(run / "mistakes_val.pt", weights_only=True)
    assert int(counts.sum()) == 30 and len(mistakes["index"]) == int(counts.sum() - counts.trace())
    assert len(set(mistakes["index"].tolist())) == len(mistakes["index"])
    return run


@pytest.mark.slow
def test_checkpoints_under_ddp_hold_every_image_of_the_epoch_once(uninterrupted: Path) -> None:
    """The training-metric sums of a mid-epoch checkpoint: the metrics' and the window of steps since the last
    logged one (every 2nd), over both ranks. At step 6 (a logged one) the window is being summed over the ranks when
    ModelCheckpoint saves, and it goes into the metrics' sums: a resumed run counted its images twice before."""
    for step, logged, window in ((3, 20, 10), (6, 60, 0)):
        sums = torch.load(uninterrupted / "steps" / f"epoch=0-step={step}.ckpt", weights_only=True)
        sums = sums["cifar_cli_train_metrics"]
        for name in ("train_loss", "train_acc"):
            assert (float(sums[name]["state"]["weight"]), float(sums["window"][2])) == (logged, window)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_failing_rank_is_named_and_every_rank_exits(images: Path, tmp_path: Path, how: str) -> None:
    """Rank 1 alone fails at step 2 (an exception, or kill -9 by its process id) while rank 0 waits for it in the
    gradient all-reduce: the command ends within a minute, non-zero, with one error line naming rank 1."""
    fault = ["--trainer.callbacks+=faults.FailOnRank", "--trainer.callbacks.step", "2",
             "--trainer.callbacks.how", "raise" if how == "raise" else "hang"]  # fmt: skip
    proc = start([*TRAIN, *ONE_NODE, "--data.root", str(images), *fault], tmp_path, ddp_env(free_port()))
    if how == "kill":
        pid_file = tmp_path / "failing.pid"
        deadline = time.monotonic() + TIMEOUT_S
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), finish(proc)[1][-2000:]
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    failed_at = time.monotonic()  # for "raise": an upper bound of the time the step failed
    code, stderr = finish(proc, timeout=TIMEOUT_S if how == "raise" else 60)
    assert time.monotonic() - failed_at < 60
    assert code == 1
    why = {
        "raise": "ValueError: bad batch 2 in this rank's shard",
        "kill": "killed by SIGKILL, without a report (out of memory, or killed by hand)",
    }[how]
    assert errors(stderr) == [f"cifar-cli: error: rank 1 failed: {why}"], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not list((tmp_path / "steps").glob("*step=3.ckpt"))  # it stopped at the failing step


@pytest.mark.slow
def test_whitening_bias_freezes_under_ddp_and_alternating_flip_runs(images: Path, tmp_path: Path) -> None:
    """DDP wants a gradient for every parameter it wrapped, at every step: the frozen whitening bias keeps taking
    one and the optimizer skips it. It trains until step 9 of 18 and is the same in every checkpoint after."""
    fast = ["--model.net", "FastNet", "--model.net.widths", "[8, 16]", "--model.whiten_bias_until", "0.5",
            "--data.augment", "true", "--data.flip", "alternate"]  # fmt: skip
    proc = start([*TRAIN, *ONE_NODE, "--data.root", str(images), *fast], tmp_path, ddp_env(free_port()))
    code, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    bias = {step: weights(tmp_path / "steps" / f"epoch={(step - 1) // 9}-step={step}.ckpt")["net.whiten.bias"]
            for step in (3, 6, 9, 12, 15, 18)}  # fmt: skip
    assert not torch.equal(bias[3], bias[6]) and not torch.equal(bias[6], bias[9])
    assert all(torch.equal(bias[9], bias[step]) for step in (12, 15, 18))


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_two_processes(images: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """The README's multi-node commands, both "nodes" on this machine: the same weights as one node, bit for bit."""
    env = ddp_env(free_port())
    args = [*TRAIN, *TWO_NODES, "--data.root", str(images)]
    nodes = [start(args, tmp_path / f"node{rank}", {**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    for rank, proc in enumerate(nodes):
        code, stderr = finish(proc)
        assert code == 0, f"node {rank}: {stderr[-2000:]}"
    # Global rank 0 writes the checkpoints; every 3 steps of 18 means each rank stepped 9 times an epoch, as on
    # one node: each node took its own half of the split.
    last = f"epoch=1-step={STEPS}.ckpt"
    assert not (tmp_path / "node1" / "steps").exists()
    assert_same_weights(tmp_path / "node0" / "steps" / last, uninterrupted / "steps" / last)


@pytest.mark.slow
def test_failing_rank_on_another_node_is_named_there(images: Path, tmp_path: Path) -> None:
    """Two nodes: rank 1 fails; node 0 reads why from the store and says so in its own output."""
    env = ddp_env(free_port())
    args = [*TRAIN, *TWO_NODES, "--data.root", str(images), "--trainer.callbacks+=faults.FailOnRank"]
    nodes = [start(args, tmp_path / f"node{rank}", {**env, "NODE_RANK": str(rank)}) for rank in (0, 1)]
    line = "cifar-cli: error: rank 1 failed: ValueError: bad batch 2 in this rank's shard"
    for proc in nodes:
        code, stderr = finish(proc)
        assert (code, errors(stderr)) == (1, [line]), stderr[-2000:]


@pytest.mark.slow
def test_signal_to_one_rank_stops_every_rank_and_resume_matches(images: Path, uninterrupted: Path, tmp_path: Path):
    """SIGTERM to rank 1 alone, before the 6th batch of the first epoch: both ranks stop at the same step (the end
    of the 7th batch: the ranks' vote started at the end of the 6th is read one batch later), exit 143, and
    `--ckpt_path last` trains on from that mid-epoch checkpoint to the uninterrupted run's last weights: a resumed
    DDP run is the uninterrupted one."""
    signal_rank_1 = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.batch", "5",
                     "--trainer.callbacks.rank", "1"]  # fmt: skip
    args = [*TRAIN, *ONE_NODE, "--data.root", str(images)]
    code, stderr = finish(start([*args, *signal_rank_1], tmp_path, ddp_env(free_port())))
    assert code == 143, stderr[-2000:]
    assert "cifar-cli: stopped by SIGTERM in epoch 1/2, step 7; resume with: " in stderr
    stopped = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == 7
    # The epoch's training-metric sums so far are both ranks': 7 batches of 5 images each (rank 0's alone before,
    # which a resumed run counted for both ranks), in the metrics' sums and the window of steps not yet logged.
    sums = stopped["cifar_cli_train_metrics"]
    for name in ("train_loss", "train_acc"):
        assert float(sums[name]["state"]["weight"]) + float(sums["window"][2]) == 7 * 5 * 2
    code, stderr = finish(start([*args, "--ckpt_path", "last"], tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    # rank 0's line, not one per rank; the epoch stopped in goes on
    assert stderr.count("cifar-cli: resuming from ") == 1 and " at step 7, epoch 1/2\n" in stderr
    last = f"epoch=1-step={STEPS}.ckpt"
    assert_same_weights(tmp_path / "steps" / last, uninterrupted / "steps" / last)


@pytest.mark.parametrize(
    "where",
    [["--trainer.callbacks.rank", "1"],
     ["--trainer.callbacks.rank", "0", "--trainer.callbacks.parent", "true", "--trainer.strategy", "ddp_spawn"]],
    ids=["ddp-rank-1", "ddp_spawn-parent"],
)  # fmt: skip
def test_sigterm_in_the_sanity_check_stops_every_rank_before_training(images: Path, tmp_path: Path, where: list[str]):
    """A SIGTERM to rank 1 alone during the validation before training hung the run: Lightning's handler broadcast
    from within it, which rank 0 never joined. Every rank stops after the sanity check now, as before training; under
    ddp_spawn too (a SIGTERM to the spawning process, passed on to the ranks)."""
    signal_at = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_sanity_check", "true", *where]
    args = [*BASE, *ONE_NODE, "--data.root", str(images), *signal_at]
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())), timeout=120)
    assert code == 143, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert stops == ["cifar-cli: stopped by SIGTERM before training began: nothing was trained or saved"]
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [[], ["--model.lr_schedule", "WarmupLinearDecay"]], ids=["steps", "budget"])
def test_training_steps_wait_for_no_collective(images: Path, tmp_path: Path, schedule: list[str]) -> None:
    """Under DDP with a time limit, no training step waits on a blocking collective, except every 10th step, where
    rank 0's clocks decide the time limit and `last.ckpt`'s timed save: no per-step stop vote (it runs
    asynchronously), no per-step broadcast of Lightning's SIGTERM flag or of its Timer's verdict. Epoch ends (steps
    9 and 18), where the ranks agree on stopping, and validations are left out. With a schedule the time budget's
    estimate of the steps it holds is renewed at those steps too, from rank 0's clock (it was every 20th)."""
    watch = ["--trainer.max_time", "00:01:00:00", "--trainer.callbacks+=faults.BlockingCollectives",
             "--trainer.callbacks.path", str(tmp_path / "collectives"), *schedule]  # fmt: skip
    code, stderr = finish(start([*BASE, *ONE_NODE, "--data.root", str(images), *watch], tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    assert "self.log('fit_time'" not in stderr  # Lightning's advice to sync rank 0's clock: nothing to act on
    for rank in (0, 1):
        calls = [json.loads(line) for line in (tmp_path / f"collectives.{rank}").read_text().splitlines()]
        steps = {call["step"] for call in calls} - {9, STEPS}
        assert steps == {10}, calls
        assert {call["op"] for call in calls if call["step"] == 10} == {"broadcast", "broadcast_object_list"}, calls
        # Rank 0's clock for the time limit and for last.ckpt's timed save, and with a schedule for the budget (each
        # a broadcast_object_list, which broadcasts twice itself)
        assert [call["op"] for call in calls if call["step"] == 10].count("broadcast_object_list") == 2 + bool(schedule)


@pytest.mark.slow
def test_predictions_of_two_processes_list_every_image_once(images: Path, uninterrupted: Path, tmp_path: Path):
    """25 images over 2 ranks: the sampler pads the shards to 13 each, and predictions.csv still lists every
    image once, in the folder's order."""
    folder = tmp_path / "new"
    folder.mkdir()
    for source in sorted((images / "train" / "cat").iterdir())[:25]:
        (folder / source.name).write_bytes(source.read_bytes())
    ckpt = uninterrupted / "steps" / f"epoch=1-step={STEPS}.ckpt"
    predict = ["predict", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", *ONE_NODE,
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--ckpt_path", str(ckpt), "--data.predict_root", str(folder)]  # fmt: skip
    code, stderr = finish(start(predict, tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    # torch's deprecation of the all_gather Lightning gathers the rows with, once per rank: nothing a user can do.
    assert "is deprecated" not in stderr, stderr[-2000:]
    with open(tmp_path / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["image"] for row in rows] == sorted(p.name for p in folder.iterdir())
    assert all(row["predicted"] in {"cat", "dog", "frog"} for row in rows)


@pytest.mark.slow
def test_validation_of_two_processes_counts_each_image_once(images: Path, uninterrupted: Path, tmp_path: Path):
    """29 validation images over 2 ranks, 7 a batch: the sampler pads rank 1's shard with a repeat, which left rank
    1's last batch empty once left out. The confusion matrix counts 29 images, and val_loss and val_acc are those of
    one process, with the flip test-time augmentation's views of an empty batch too. (Fewer than the 30 the run
    held out: a checkpoint is refused on images it may have trained on.)"""
    ckpt = uninterrupted / "steps" / f"epoch=1-step={STEPS}.ckpt"
    validate = ["validate", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--data", "ImageFolderDataModule", "--data.root", str(images),
                "--data.val_size", "29", "--data.batch_size", "7", "--data.cache_dir", "cache", "--model.tta", "flip",
                "--ckpt_path", str(ckpt)]  # fmt: skip
    confusion, metrics = {}, {}
    for name, devices in (("one", ["--trainer.devices", "1"]), ("two", ["--trainer.strategy", "ddp", *ONE_NODE])):
        code, stdout, stderr = finish_with_output(start([*validate, *devices], tmp_path / name, ddp_env(free_port())))
        assert code == 0, stderr[-2000:]
        with open(tmp_path / name / "confusion_val.csv", newline="") as file:
            confusion[name] = list(csv.reader(file))
        # The printed table's rows: "│ val_acc │ 1.0 │"
        rows = [line.strip("│ ").split() for line in stdout.splitlines() if " val_" in line]
        metrics[name] = {row[0]: float(row[-1].strip("│")) for row in rows}
    assert sum(int(x) for row in confusion["two"][1:] for x in row[1:]) == 29
    assert confusion["two"] == confusion["one"]
    # Equal but for the order of the sums (each rank's, then theirs)
    assert metrics["two"].keys() == {"val_acc", "val_loss"}
    assert metrics["two"] == pytest.approx(metrics["one"], rel=1e-6)


def test_sigusr1_to_one_rank_during_a_validation_is_named_by_rank_0(images: Path, tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 alone during the validation at the end of the first epoch: the validation is finished, the
    ranks agree at its end, and every rank stops there (step 9, the epoch's last). Rank 0's line named SIGTERM and
    the command exited 143: the ranks' agreement there carried no signal, only that there was one."""
    signal_at = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_validation", "true",
                 "--trainer.callbacks.batch", "1", "--trainer.callbacks.rank", "1",
                 "--trainer.callbacks.signum", "10"]  # fmt: skip
    args = [*TRAIN, *ONE_NODE, "--data.root", str(images), "--data.batch_size", "5", *signal_at]
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())), timeout=120)
    assert code == 138, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert len(stops) == 1 and stops[0].startswith("cifar-cli: stopped by SIGUSR1 in epoch "), stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_one_rank_as_training_starts_stops_every_rank(images: Path, tmp_path: Path, signum: int):
    """A signal to rank 1 alone between the sanity check and training's own handlers: a SIGTERM met Lightning's
    handler, which broadcast from within it to ranks that never joined, and the run hung; a SIGUSR1 met the
    start-up's stop, which ended rank 1 alone ("rank 1 failed: exited with code 138 without a report"). Both are
    noted from the trainer's start now, and the ranks stop together at the first batch end's vote."""
    signal_at = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.at_train_start", "true",
                 "--trainer.callbacks.rank", "1", "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip
    args = [*TRAIN, *ONE_NODE, "--data.root", str(images), *signal_at]
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())), timeout=120)
    assert code == 128 + signum, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    name = signal.Signals(signum).name
    assert len(stops) == 1 and stops[0].startswith(f"cifar-cli: stopped by {name} in epoch 1/2, step 2; "), stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_a_signal_to_one_rank_as_the_ranks_start_is_named_as_such(images: Path, tmp_path: Path) -> None:
    """A SIGTERM to rank 1 alone while the ranks set up (before the trainer's handlers) ends that rank's start: the
    run ends as its failure, and the line says what stopped it and how a signal stops a run cleanly. It said
    "exited with code 143 without a report", as for a crash."""
    signal_at = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.at_setup", "true",
                 "--trainer.callbacks.rank", "1"]  # fmt: skip
    code, stderr = finish(start([*TRAIN, *ONE_NODE, "--data.root", str(images), *signal_at], tmp_path,
                                ddp_env(free_port())), timeout=120)  # fmt: skip
    assert code == 1, stderr[-2000:]
    assert errors(stderr) == [
        "cifar-cli: error: rank 1 failed: stopped by SIGTERM, sent to it alone; a signal sent to rank 0 or to every "
        "rank stops the run cleanly"
    ], stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_fork"])
def test_sigusr1_to_one_rank_stops_every_rank_and_names_it(images: Path, tmp_path: Path, strategy: str) -> None:
    """SIGUSR1 to rank 1 alone, before its 4th batch: every rank stops at step 5 (the vote started at the end of the
    4th is read at the end of the 5th), and rank 0's line names SIGUSR1, not the SIGTERM it reported for another
    rank's signal. Under ddp_fork the signal was ignored and the run trained on to its end: the forked rank had
    inherited the spawning process's handler, which Lightning and cifar-cli left in place."""
    signal_rank_1 = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.batch", "3",
                     "--trainer.callbacks.rank", "1", "--trainer.callbacks.signum", "10"]  # fmt: skip
    args = [*TRAIN, "--trainer.strategy", strategy, *ONE_NODE, "--data.root", str(images), *signal_rank_1]
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())), timeout=120)
    assert code == 138, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert len(stops) == 1 and stops[0].startswith("cifar-cli: stopped by SIGUSR1 in epoch 1/2, step 5; "), stderr
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("subcommand", "signum"),
    [("validate", signal.SIGTERM), ("test", signal.SIGUSR1), ("predict", signal.SIGTERM)],
    ids=["validate", "test-SIGUSR1", "predict"],
)
def test_a_signal_to_one_rank_stops_every_rank_of_an_evaluation(
    images: Path, uninterrupted: Path, tmp_path: Path, subcommand: str, signum: int
) -> None:
    """A SIGTERM or SIGUSR1 to rank 1 alone in `validate`, `test` or `predict` hung both ranks until the
    process group's timeout: Lightning's handler broadcast from within it, which rank 0 never joined, and stopped
    rank 1 alone. Every rank stops at the same batch now, as in training: rank 0's one line names the signal rank 1
    was sent, the command exits with 128 + its number, and no results are written."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for source in sorted((images / "train").rglob("*.jpg"))[:30]:  # a test split for `test`, a folder to predict
        target = data / "test" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    (data / "train").rmdir()
    (data / "train").symlink_to(images / "train")
    ckpt = uninterrupted / "steps" / f"epoch=1-step={STEPS}.ckpt"
    args = [subcommand, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", *ONE_NODE,
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(ckpt),
            "--data", "ImageFolderDataModule", "--data.root", str(data), "--data.val_size", "30",
            "--data.batch_size", "2", "--data.cache_dir", "cache",
            *(["--data.predict_root", str(data / "test" / "cat")] if subcommand == "predict" else []),
            # rank 1 alone, in its evaluation batch 1 (of 8)
            "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.in_validation", "true",
            "--trainer.callbacks.batch", "1", "--trainer.callbacks.rank", "1",
            "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip
    code, stderr = finish(start(args, tmp_path / "run", ddp_env(free_port())), timeout=120)
    name = signal.Signals(signum).name
    assert code == 128 + signum, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert stops == [f"cifar-cli: stopped by {name} during {STAGES[subcommand]}: no results were written"], stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    written = {p.name for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert not written & {"confusion_val.csv", "confusion_test.csv", "predictions.csv", "summary.json"}, written


@pytest.mark.slow
def test_weight_averaging_under_ddp(images: Path, tmp_path: Path) -> None:
    """EMA (configs/fast.yaml and fast-cpu.yaml) copies the model at set-up: on rank 0, whose trainer holds the
    launched rank's process, the copy failed ("cannot pickle '_thread.lock' object") before the first step."""
    ema = ["--trainer.callbacks+=cifar_cli.averaging.EMA", "--trainer.callbacks.decay", "0.5",
           "--trainer.callbacks.update_every_n_steps", "3",
           "--optimizer", "SGD", "--optimizer.momentum", "0.9"]  # fmt: skip
    code, stderr = finish(start([*TRAIN, *ONE_NODE, "--data.root", str(images), *ema], tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    saved = torch.load(tmp_path / "steps" / f"epoch=1-step={STEPS}.ckpt", weights_only=True)
    # Updated at steps 3, 6, ..., 18: the copy made at set-up averaged on
    assert int(saved["averaging_state"]["n_averaged"]) == STEPS // 3


@pytest.mark.slow
def test_torchrun_with_other_devices_than_processes_says_so_in_a_line(images: Path, tmp_path: Path) -> None:
    """torchrun starts 2 processes, --trainer.devices says 1: a rank says so in one line (Lightning checked it only
    as it launched, and each rank printed a traceback); torchrun's own report of the failed ranks follows. torchrun
    stops the other rank as the first fails, which may be before that one has said anything."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes", "1", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "cifar_cli"]  # fmt: skip
    args = [*BASE, "--trainer.devices", "1", "--data.root", str(images)]
    proc = subprocess.Popen([*torchrun, *args], cwd=tmp_path, env=ddp_env(free_port()), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    code, stderr = finish(proc)
    assert code != 0
    line = ("cifar-cli: error: --trainer: You set `devices=1` and `num_nodes=1` in Lightning, but the product (1 * 1) "
            "does not match the world size (2).")  # fmt: skip
    assert errors(stderr) in ([line], [line, line]), stderr[-3000:]
    assert "validate_settings" not in stderr, stderr[-3000:]  # no rank's traceback


@pytest.mark.slow
def test_failing_rank_under_ddp_spawn_is_named_in_a_line(images: Path, tmp_path: Path) -> None:
    """Under ddp_spawn the launching process hears of a rank's failure from torch's spawn, as the rank's traceback in
    text, which it printed inside its own: one line names the rank and the error."""
    args = [*TRAIN, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--data.root", str(images),
            "--trainer.callbacks+=faults.FailOnRank"]  # fmt: skip
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())))
    assert code == 1
    assert errors(stderr) == ["cifar-cli: error: rank 1 failed: ValueError: bad batch 2 in this rank's shard"], stderr
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_ddp_spawn_summary_has_the_ranks_epochs_steps_and_best_score(images: Path, tmp_path: Path) -> None:
    """Under ddp_spawn the ranks train in processes of their own, and the spawning process, which prints the
    summary, learnt only their metrics and best checkpoint's path from Lightning: "0 epochs, step 0", no score."""
    args = [*BASE, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--data.root", str(images)]
    code, stdout, stderr = finish_with_output(start(args, tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    assert f"cifar-cli fit: 2 epochs, step {STEPS}" in stdout, stdout[-2000:]
    assert "Best checkpoint (val_loss " in stdout, stdout[-2000:]
    # The ranks silence the warnings the command silences (a spawned process starts without its filters)
    assert "LeafSpec" not in stderr and "not supported by the model summary" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_ddp_spawn_says_how_an_swa_run_ended(images: Path, tmp_path: Path) -> None:
    """Under ddp_spawn rank 0 logs Lightning's stop line in a process of its own, without the filter that makes it
    true, and SWA's BatchNorm pass is set up there alone: a run of 1 epoch read "`max_epochs=2` reached" and
    "cifar-cli fit: 2 epochs"."""
    args = [*BASE, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--data.root", str(images),
            "--trainer.max_epochs", "1", "--model.net", "FastNet", "--model.net.widths", "[8, 16, 16]",
            "--model.lr_schedule", "null", "--trainer.callbacks+=StochasticWeightAveraging",
            "--trainer.callbacks.swa_lrs", "0.01"]  # fmt: skip
    code, stdout, stderr = finish_with_output(start(args, tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    output = stdout + stderr
    assert "`Trainer.fit` stopped: `max_epochs=1` reached, then StochasticWeightAveraging's BatchNorm pass." in output
    assert "max_epochs=2" not in output
    assert "cifar-cli fit: 1 epoch and SWA BatchNorm pass, step 10" in stdout, stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_spawning_process_stops_the_ranks_as_under_ddp(images: Path, tmp_path: Path,
                                                                       signum: int) -> None:  # fmt: skip
    """Under ddp_spawn a SIGTERM (a scheduler's, `kill`) or a SIGUSR1 (SLURM's warning before its time limit, where
    no requeue takes it) reaches the process that spawned the ranks: it died at once with 143 (138) and no word,
    and the ranks trained on, orphaned. It goes on to the ranks now, which stop at the same step, save last.ckpt and
    say how to resume, as under ddp; and no process of the run lives on."""
    signal_parent = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.batch", "5",
                     "--trainer.callbacks.rank", "0", "--trainer.callbacks.parent", "true",
                     "--trainer.callbacks.signum", str(int(signum))]  # fmt: skip
    args = [*TRAIN, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--data.root", str(images), *signal_parent]
    proc = start(args, tmp_path, ddp_env(free_port()))
    code, stderr = finish(proc)
    assert code == 128 + signum, stderr[-2000:]
    assert f"cifar-cli: stopped by {signal.Signals(signum).name} in epoch 1/2, step " in stderr, stderr[-2000:]
    assert f"resume with: cifar-cli fit --config {tmp_path / 'config.yaml'} --ckpt_path " in stderr, stderr[-2000:]
    stopped = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 6 <= stopped["global_step"] < STEPS // 2
    deadline = time.monotonic() + 5  # the ranks and multiprocessing's resource tracker end with the run
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a process of the run lived on after it ended")


def test_a_signal_to_the_spawning_process_after_training_ended_stops_in_one_line(images: Path, tmp_path: Path):
    """Under ddp_spawn a SIGTERM to the spawning process once the ranks' training had ended (in `on_fit_end`, where
    W&B's checkpoint versions are logged) went on to the ranks, which it killed there: the command said "stopped by
    SIGTERM before training began: nothing was trained or saved" of a run trained to its end. Now the ranks finish,
    and the command ends as a process alone does then."""
    signal_parent = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.at_fit_end", "true",
                     "--trainer.callbacks.rank", "0", "--trainer.callbacks.parent", "true"]  # fmt: skip
    args = [*BASE, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--trainer.max_epochs", "1",
            "--data.root", str(images), *signal_parent]  # fmt: skip
    code, stderr = finish(start(args, tmp_path, ddp_env(free_port())), timeout=120)
    assert code == 143, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert stops == [
        "cifar-cli: stopped by SIGTERM after training ended (its checkpoints are saved), before its summary"
    ], stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS // 2


@pytest.mark.slow
def test_a_csv_logger_run_under_ddp_spawn_restarts_with_its_changes_recorded_once(images: Path, tmp_path: Path):
    """`--trainer.strategy ddp_spawn --trainer.logger CSVLogger` stopped before training with "Can't pickle local
    object" (the logger goes to the ranks pickled). A restart with changed settings: config.yaml and its kept copy
    are rank 0's, the change is said once, and metrics.csv keeps the first start's rows."""
    args = [*BASE, *ONE_NODE, "--trainer.strategy", "ddp_spawn", "--data.root", str(images),
            "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "runs"]  # fmt: skip
    code, stderr = finish(start([*args, "--trainer.max_epochs", "1"], tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    restart = [*args, "--trainer.max_epochs", "2", "--model.learning_rate", "0.001", "--ckpt_path", "last"]
    code, stderr = finish(start(restart, tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    assert stderr.count("cifar-cli: this restart changes the run's settings (trainer.max_epochs 1 -> 2") == 1
    # The ranks, new interpreters, lacked the filters the command sets for a resumed run: each warned that
    # Lightning would delete the run's metrics.csv (which cifar-cli keeps) and that its checkpoint folder was not empty.
    assert "exists and is not empty" not in stderr, stderr[-3000:]
    (run,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    assert sorted(p.name for p in run.glob("config*")) == [f"config-until-step-{STEPS // 2}.yaml", "config.yaml"]
    assert "max_epochs: 2\n" in (run / "config.yaml").read_text()
    with open(run / "metrics.csv", newline="") as file:
        assert {row["epoch"] for row in csv.DictReader(file)} == {"0", "1"}


# The default W&B logger, offline (as configs/default.yaml has it), in place of BASE's `--trainer.logger false`; the
# callbacks that log to it are the default ones.
WANDB = ["--trainer.logger", "WandbLogger", "--trainer.logger.offline", "true", "--trainer.logger.save_dir", "runs"]


def wandb_run(folder: Path) -> tuple[str, OfflineRun]:
    """The id and records of the one offline W&B run under `folder`/runs/wandb."""
    (run,) = (folder / "runs" / "wandb").glob("offline-run-*")
    return run.name.rsplit("-", 1)[1], read_run(run)


def history(run: OfflineRun) -> list[tuple[int, dict[str, float], list[str]]]:
    """Each history row as its step, its scalars and the panels (images, tables) it holds."""
    rows = []
    for row in run.history:
        panels = sorted(k.rsplit("/", 1)[0] for k in row if k.endswith("/_type"))
        scalars = {k: v for k, v in row.items() if not k.startswith("_") and k.split("/")[0] not in panels
                   and k != "trainer/global_step"}  # fmt: skip
        rows.append((row["trainer/global_step"], scalars, panels))
    return rows


def prediction_rows(run: OfflineRun, key: str) -> dict[int, list]:
    """The prediction table's rows by image index: label, predicted, confidence, correct."""
    table = run.table(key)
    assert table["columns"][:6] == ["index", "image", "label", "predicted", "confidence", "correct"]
    return {row[0]: row[2:6] for row in table["data"]}


@pytest.mark.slow
def test_wandb_under_ddp_holds_one_run_as_one_process_logs_it(images: Path, tmp_path: Path) -> None:
    """The W&B dashboard of a DDP fit (2 ranks, 5 images a batch each) is the one of a one-process fit with 10 a
    batch, which trains the same images at each step: one offline run and one `wandb sync` line, each metric once at
    each step with the same value (the step values too: they were rank 0's half of each step's images), the same
    tables, example captions and confusion matrices, and the two model versions logged once. Then `validate` of 29
    images under ddp_spawn (whose ranks log to the W&B run the spawning process started; rank 1's shard padded with
    a repeat, left out): one run, and every table and count holds each image once."""
    fit = [*BASE, "--data.root", str(images), *WANDB, "--trainer.precision", "32-true",
           "--trainer.log_every_n_steps", "3"]  # fmt: skip
    runs = {}
    for name, placement in (("two", ONE_NODE), ("one", ["--trainer.strategy", "auto", "--trainer.devices", "1",
                                                         "--data.batch_size", "10"])):  # fmt: skip
        code, stdout, stderr = finish_with_output(start([*fit, *placement], tmp_path / name, ddp_env(free_port())))
        assert code == 0, stderr[-2000:]
        run_id, run = wandb_run(tmp_path / name)
        assert (stdout + stderr).count("wandb sync") == 1 and f"-{run_id}\n" in stdout, stdout[-2000:]
        runs[name] = run_id, run
    (two_id, two), (_, one) = runs["two"], runs["one"]

    rows = history(two)
    assert [(step, sorted(scalars), panels) for step, scalars, panels in rows] == [
        (step, sorted(scalars), panels) for step, scalars, panels in history(one)
    ]
    steps = [step for step, scalars, _ in rows if "train_loss_step" in scalars]
    assert steps == [2, 5, 8, 11, 14, 17]  # every 3rd step, once each
    for (_, scalars, _), (_, expected, _) in zip(rows, history(one)):
        for clock in (scalars, expected):  # fit_time: seconds of training
            clock.pop("fit_time", None)
        assert scalars == pytest.approx(expected, rel=1e-4)  # (DDP sums the gradients in another order)
    captions = [[row["examples/captions"] for row in run.history if "examples/captions" in row] for run in (two, one)]
    assert len(captions[0]) == 2 and captions[0] == captions[1]
    predictions = prediction_rows(two, "val_predictions")
    assert sorted(predictions) == list(range(30))
    expected = prediction_rows(one, "val_predictions")
    assert {i: row[:2] + row[3:] for i, row in predictions.items()} == {
        i: row[:2] + row[3:] for i, row in expected.items()
    }
    confidences = [expected[i][2] for i in predictions]  # rounded to 4 places
    assert [row[2] for row in predictions.values()] == pytest.approx(confidences, abs=2e-4)
    assert two.table("val_confusion_matrix_table")["data"] == one.table("val_confusion_matrix_table")["data"]
    for run_id, run in runs.values():
        models = [
            (a["name"], a["metadata"]["file"], sorted(a["aliases"])) for a in run.artifacts if a["type"] == "model"
        ]
        assert models == [(f"model-{run_id}", f"epoch=1-step={STEPS}.ckpt", ["best", "latest"]),
                          (f"model-{run_id}", "last.ckpt", ["latest"])]  # fmt: skip

    (best,) = (tmp_path / "two" / "runs").glob(f"*/{two_id}/checkpoints/epoch=1-step={STEPS}.ckpt")
    validate = ["validate", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp_spawn", *ONE_NODE, *WANDB,
                "--trainer.enable_progress_bar", "false", "--data", "ImageFolderDataModule", "--data.root", str(images),
                "--data.val_size", "29", "--data.batch_size", "7", "--data.cache_dir", "cache",
                "--ckpt_path", str(best)]  # fmt: skip
    code, stdout, stderr = finish_with_output(start(validate, tmp_path / "validate", ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    assert (stdout + stderr).count("wandb sync") == 1, stdout[-2000:]
    # wandb's notice that Lightning's `wandb.require("service")`, called as the logger is pickled for the ranks, does
    # nothing: a line on every ddp_spawn run with W&B, which the user can do nothing about
    assert "wandb.require('service')" not in stdout + stderr, stderr[-2000:]
    run_id, run = wandb_run(tmp_path / "validate")
    predictions = prediction_rows(run, "val_predictions")
    assert sorted(predictions) == list(range(29))
    (confusion,) = (tmp_path / "validate" / "runs").glob(f"*/{run_id}/confusion_val.csv")
    with open(confusion, newline="") as file:
        header, *matrix = list(csv.reader(file))
    counts = {(actual, header[j]): int(n) for actual, *row in matrix for j, n in enumerate(row, 1)}
    assert sum(counts.values()) == 29
    assert {(a, p): n for a, p, n in run.table("val_confusion_matrix_table")["data"]} == counts
    (examples,) = [row["examples/captions"] for row in run.history if "examples/captions" in row]
    sample = torch.randperm(29, generator=torch.Generator().manual_seed(0)).tolist()  # as the logger draws it
    assert examples == [f"Pred: {predictions[i][1]}, Label: {predictions[i][0]}" for i in sample]
    assert run.summary["val_acc"] == pytest.approx(sum(row[3] for row in predictions.values()) / 29)


@pytest.mark.slow
def test_a_wandb_run_stopped_under_ddp_goes_on_in_the_same_run(images: Path, tmp_path: Path) -> None:
    """SIGTERM to rank 1 of a DDP fit with W&B: exit 143, one stop line and one `wandb sync` line (rank 0's), and
    the offline run whole, ended with 143. `--ckpt_path last` goes on in the same W&B run: a second offline part of
    the same id, from step 7 on, which the sync line names after the first, and the model versions logged once."""
    args = [*BASE, *ONE_NODE, "--data.root", str(images), *WANDB, "--trainer.log_every_n_steps", "2"]
    signal_rank_1 = ["--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.batch", "5",
                     "--trainer.callbacks.rank", "1"]  # fmt: skip
    code, stdout, stderr = finish_with_output(start([*args, *signal_rank_1], tmp_path, ddp_env(free_port())))
    assert code == 143, stderr[-2000:]
    stops = [line for line in stderr.splitlines() if line.startswith("cifar-cli: stopped by")]
    assert len(stops) == 1 and stops[0].startswith("cifar-cli: stopped by SIGTERM in epoch 1/2, step 7; "), stderr
    run_id, stopped = wandb_run(tmp_path)
    (part,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert [line for line in (stdout + stderr).splitlines() if "wandb sync" in line] == [
        f"Upload to W&B: wandb sync runs/wandb/{part.name}"
    ]
    exits = [r.exit.exit_code for r in records(next(part.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "exit"]
    assert exits == [143] and not stopped.artifacts  # (its checkpoints' versions come as the resumed run ends)
    assert [row["trainer/global_step"] for row in stopped.history] == [1, 3, 5]  # every 2nd step, once each

    code, stdout, stderr = finish_with_output(start([*args, "--ckpt_path", "last"], tmp_path, ddp_env(free_port())))
    assert code == 0, stderr[-2000:]
    first, second = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert first == part and second.name.endswith(f"-{run_id}")
    syncs = [line for line in (stdout + stderr).splitlines() if "wandb sync" in line]
    assert syncs == [f"Upload to W&B: wandb sync runs/wandb/{first.name} runs/wandb/{second.name}"]
    resumed = read_run(second)
    steps = [row["trainer/global_step"] for row in resumed.history if "train_loss_step" in row]
    assert steps == [7, 9, 11, 13, 15, 17]
    models = sorted((a["name"], sorted(a["aliases"])) for a in resumed.artifacts if a["type"] == "model")
    assert models == [(f"model-{run_id}", ["best", "latest"]), (f"model-{run_id}", ["latest"])]
