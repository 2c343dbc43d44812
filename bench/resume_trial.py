"""`make bench-resume`: kill training at random moments, resume it, and count the runs that end bit for bit where
an uninterrupted run ends.

One uninterrupted run of the recipe gives the reference. Each trial starts the same command in a fresh folder
and, so that every kill lands in training (not in the start-up or the shutdown, whose length varies with the
machine's load), waits for a random number (1 to 5) of `last.ckpt` saves, then a random 0 to 0.5 s more, which
falls anywhere in a step or a save; it kills the run (SIGKILL and SIGTERM in turn), checks that every `*.ckpt`
left behind loads, and resumes with `--ckpt_path last` until the run finishes. Its final checkpoint (weights,
EMA weights, optimizer state) is compared tensor by tensor with the reference's: `torch.equal`, no tolerance.

The recipe is configs/fast-cpu.yaml (augmentation, EMA, warm-up and decay with a restart, bf16-mixed) with a
narrow network and 3 short epochs, so that a trial takes seconds; checkpoints every 5 steps, so that kills land
between saves as well as on them.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from jsonargparse.typing import PositiveInt

from bench.common import CONFIGS, bench_env, check_output_folder, command
from cifar_cli.atomic import atomic_write_text
from cifar_cli.errors import UsageError

RECIPE = ["--config", str(CONFIGS / "cifar10-jpg.yaml"), "--config", str(CONFIGS / "fast-cpu.yaml"),
          "--model.net.init_args.widths", "[16, 32, 32]", "--data.batch_size", "256",
          "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "12", "--trainer.limit_val_batches", "2",
          "--last_checkpoint.every_n_steps", "5", "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "logs"]  # fmt: skip


def fresh(cwd: Path) -> Path:
    """`cwd` emptied: a run of an earlier `make bench-resume` left its `last.ckpt` there, which would count as a
    save of the new run and which `--ckpt_path last` would resume."""
    shutil.rmtree(cwd, ignore_errors=True)
    return cwd


def fit(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "output.log", "a")  # noqa: SIM115 (the process owns it until it ends)
    command = [sys.executable, "-m", "cifar_cli", "fit", *RECIPE, *args]
    return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=bench_env())


def wait_for_saves(process: subprocess.Popen, cwd: Path, saves: int) -> None:
    """Wait until the run has written `last.ckpt` `saves` times (or has ended)."""
    seen: set[int] = set()
    while len(seen) < saves and process.poll() is None:
        for path in cwd.glob("logs/**/checkpoints/last.ckpt"):
            try:
                seen.add(path.stat().st_mtime_ns)
            except FileNotFoundError:  # between two saves' renames
                pass
        time.sleep(0.01)


def final_state(cwd: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's final `last.ckpt`: weights, EMA weights, optimizer state."""
    path = max(cwd.glob("logs/**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    checkpoint = torch.load(path, weights_only=True)
    tensors = {f"state_dict.{k}": v for k, v in checkpoint["state_dict"].items()}
    tensors |= {f"current.{k}": v for k, v in checkpoint.get("current_model_state", {}).items()}
    for i, state in checkpoint["optimizer_states"][0]["state"].items():
        tensors |= {f"optimizer.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors


def all_loadable(cwd: Path) -> bool:
    for path in cwd.rglob("*.ckpt"):
        try:
            torch.load(path, weights_only=True)
        except Exception:
            return False
    return True


def run(
    root: str = "data/cifar10-jpg", out: str = "runs/bench-resume", trials: PositiveInt = 10, seed: int = 0
) -> dict:
    """Run the trials and print one line each, then the count.

    Args:
        root: Image folder with `train/<class>/` (`make data` unpacks the CIFAR-10 JPEGs there).
        out: Folder for the runs.
        trials: Kill-and-resume trials, half with SIGKILL, half with SIGTERM.
        seed: Seed of the random kill moments.
    """
    root_path, out_path = Path(root).resolve(), Path(out).resolve()
    if not (root_path / "train").is_dir():
        raise UsageError(f"{root_path} has no train/ folder: run `make data` or pass --root")
    check_output_folder(out_path, "--out")
    data = ["--data.root", str(root_path)]
    start = time.perf_counter()
    if fit(data, fresh(out_path / "reference")).wait():
        # The run's own last line (cifar-cli's one-line error, or a traceback's last) says why; the log has the rest.
        log = out_path / "reference" / "output.log"
        why = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench-resume: the reference run failed: {why} (see {log})")
    expected = final_state(out_path / "reference")
    duration = time.perf_counter() - start
    print(f"reference: {duration:.1f} s, {len(expected)} tensors")
    rng = random.Random(seed)
    rows = []
    for trial in range(trials):
        cwd = fresh(out_path / f"trial-{trial}")
        kind = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        saves, delay = rng.randint(1, 5), rng.uniform(0.0, 0.5)
        process = fit(data, cwd)
        wait_for_saves(process, cwd, saves)
        time.sleep(delay)
        process.send_signal(kind)
        code = killed = process.wait()
        loadable = all_loadable(cwd)
        resumes = 0
        while not list(cwd.glob("logs/**/checkpoints/last.ckpt")) or code != 0:
            resumes += 1
            code = fit([*data, "--ckpt_path", "last"], cwd).wait()
            if resumes > 3:
                break
        # A trial whose resumes all failed has no final state to compare: a row that says so, not a traceback that
        # lost the other trials' rows.
        finished = code == 0 and any(cwd.glob("logs/**/checkpoints/last.ckpt"))
        state = final_state(cwd) if finished else {}
        equal = (
            finished and state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
        )
        rows.append({"trial": trial, "signal": kind.name, "after_saves": saves, "then_s": round(delay, 2),
                     "exit": killed, "resumes": resumes, "finished": finished, "checkpoints_loadable": loadable,
                     "equal": equal})  # fmt: skip
        print(json.dumps(rows[-1]))
    exact = sum(r["equal"] and r["checkpoints_loadable"] for r in rows)
    summary = {"trials": trials, "exact": exact, "reference_seconds": round(duration, 1), "rows": rows}
    print(f"{exact} of {trials} interrupted and resumed runs ended with exactly the uninterrupted run's weights")
    atomic_write_text(out_path / "results.json", json.dumps(summary, indent=2))
    if exact < trials:  # a check, as the GPU check is: a CI job running it fails when resuming does
        raise SystemExit(f"bench-resume: {trials - exact} of {trials} resumed runs did not end with the "
                         f"uninterrupted run's weights (see {out_path / 'results.json'})")  # fmt: skip
    return summary


if __name__ == "__main__":
    command(run, "bench-resume")
