"""On a CUDA GPU: the batch path on the device, configs/gpu.yaml and fast.yaml end to end. Skipped without one.

The end-to-end runs also run on the CPU (`--trainer.accelerator cpu`), in every run of the suite: a GPU test that
only a GPU machine runs went stale unseen (three expected a checkpoint or a step count that fit no longer gave)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_process_world
from lightning.pytorch import Callback

from cifar_cli import precision
from cifar_cli.cli import main
from cifar_cli.data import CIFAR10DataModule, DeviceBatches
from cifar_cli.precision import default_precision

REPO = Path(__file__).resolve().parents[1]
# Each end-to-end test on the GPU (marked, skipped without one) and on the CPU.
GPU_AND_CPU = pytest.mark.parametrize("accelerator", [pytest.param("gpu", marks=pytest.mark.gpu), "cpu"])


def best_checkpoint(folder: str) -> Path:
    """The one checkpoint ModelCheckpoint kept in `folder`, not the `last.ckpt` that every fit keeps for resuming."""
    (ckpt,) = (p for p in Path(folder).glob("*.ckpt") if not p.name.startswith("last"))
    return ckpt


@pytest.mark.gpu
def test_preprocess_on_gpu_matches_cpu(fake_cifar10: Path) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40)
    data.setup("fit")
    images = data.splits["val"].images
    on_gpu = data.preprocess(images.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), data.preprocess(images))


@GPU_AND_CPU
def test_fit_with_gpu_config(fake_cifar10: Path, accelerator: str) -> None:
    gpu, debug = REPO / "configs" / "gpu.yaml", REPO / "configs" / "debug.yaml"
    main(["fit", "--config", str(gpu), "--config", str(debug), "--data.data_dir", str(fake_cifar10),
          "--data.val_size", "40", "--trainer.accelerator", accelerator])  # fmt: skip
    state = torch.load(best_checkpoint("runs/debug/checkpoints"), weights_only=True)
    assert state["global_step"] == 5  # 160 images / batch 32
    # The precision chosen for this GPU: bf16-mixed where it supports bf16, else 16-mixed, which trains with a
    # gradient scaler whose state the checkpoint keeps.
    config = yaml.safe_load(next(Path("runs/debug").rglob("config.yaml")).read_text())
    if accelerator == "cpu":
        assert config["trainer"]["precision"] == default_precision("cpu")[0]
    elif torch.cuda.is_bf16_supported(including_emulation=False):
        assert config["trainer"]["precision"] == "bf16-mixed"
    else:
        assert config["trainer"]["precision"] == "16-mixed" and "scale" in state["MixedPrecision"]


@GPU_AND_CPU
def test_fit_with_ddp_fork(image_folder: Path, accelerator: str) -> None:
    """ddp_fork forks its ranks from the command's process, whose CUDA they cannot use once it is initialised there
    ("Cannot re-initialize CUDA in forked subprocess"): the precision chosen for the GPU (read in a child process)
    and the optimizer's check leave it uninitialised. A command of its own: this process may have initialised CUDA
    in earlier tests (an image folder: the fake CIFAR-10's checksums are this process's)."""
    gpu, debug = REPO / "configs" / "gpu.yaml", REPO / "configs" / "debug.yaml"
    command = [sys.executable, "-m", "cifar_cli", "fit", "--config", str(gpu), "--config", str(debug),
               "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
               "--trainer.accelerator", accelerator, "--trainer.strategy", "ddp_fork"]  # fmt: skip
    # Without OMP_NUM_THREADS (which make test sets to 1): the rank, forked after the command's process had used
    # OpenMP's threads (decoding the folder), waited forever at its first parallel operation with more than one.
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    # 90 training images, batch 32: 2 whole batches (training drops the short last one).
    assert torch.load(best_checkpoint("runs/debug/checkpoints"), weights_only=True)["global_step"] == 2
    if accelerator == "cpu":
        said = f"Precision {default_precision('cpu')[0]} (this CPU"
    elif torch.cuda.is_bf16_supported(including_emulation=False):
        said = f"Precision bf16-mixed ({torch.cuda.get_device_name()} supports bf16)"
    else:
        said = f"Precision 16-mixed ({torch.cuda.get_device_name()} has no bf16)"
    assert said in run.stderr


@pytest.mark.gpu
def test_the_gpu_probe_reads_the_gpu_as_torch_does_here() -> None:
    precision.gpu_apart.cache_clear()
    try:
        found = precision.gpu_apart()
    finally:
        precision.gpu_apart.cache_clear()
    assert found == (torch.cuda.get_device_name(), torch.cuda.is_bf16_supported(including_emulation=False))


@pytest.mark.gpu
def test_a_setting_only_a_gpu_takes_trains_on_the_gpu(fake_cifar10: Path) -> None:
    """The optimizer's settings are tried before training, once, over a dummy weight: on the GPU the run trains on,
    or Adam's `capturable`, which torch takes for GPU weights only, was refused (in a traceback)."""
    gpu, debug = REPO / "configs" / "gpu.yaml", REPO / "configs" / "debug.yaml"
    main(["fit", "--config", str(gpu), "--config", str(debug), "--data.data_dir", str(fake_cifar10),
          "--data.val_size", "40", "--model.optimizer.capturable", "true"])  # fmt: skip
    assert torch.load(best_checkpoint("runs/debug/checkpoints"), weights_only=True)["global_step"] == 5


@GPU_AND_CPU
def test_fast_config_end_to_end(fake_cifar10: Path, accelerator: str) -> None:
    fast, debug = REPO / "configs" / "fast.yaml", REPO / "configs" / "debug.yaml"
    main(["fit", "--config", str(fast), "--config", str(debug), "--data.data_dir", str(fake_cifar10),
          "--data.val_size", "40", "--data.batch_size", "32", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.accelerator", accelerator])  # fmt: skip
    state = torch.load(best_checkpoint("runs/debug/checkpoints"), weights_only=True)
    assert state["global_step"] == 5 and "current_model_state" in state  # EMA weights saved beside the raw ones


@pytest.mark.gpu
def test_batches_are_cut_on_the_gpu(fake_cifar10: Path) -> None:
    data = CIFAR10DataModule(str(fake_cifar10), val_size=40)
    data.setup("fit")
    split = data.splits["train"].to(torch.device("cuda"))
    images, labels = next(iter(DeviceBatches(split, 32, shuffle=True)))
    assert images.device.type == "cuda" and labels.device.type == "cuda" and images.dtype == torch.uint8


@pytest.mark.gpu
def test_host_and_disk_placement_send_the_device_placements_batches(fake_cifar10: Path) -> None:
    # The copy path of host and disk placement: page-locked staging buffers, a copy stream, events.
    cuda = torch.device("cuda")

    def epoch(placement: str) -> list[torch.Tensor]:
        data = CIFAR10DataModule(str(fake_cifar10), val_size=40, augment=True, placement=placement)
        data.setup("fit")
        train = data.splits["train"]
        on_gpu = placement == "device"
        batches = DeviceBatches(train.to(cuda) if on_gpu else train, 32, shuffle=True, seed=3,
                                augment=data.augment_batch, device=None if on_gpu else cuda)  # fmt: skip
        batches.sampler.set_epoch(1)
        out = [t for batch in batches for t in batch]
        assert all(t.device.type == "cuda" for t in out)
        return [t.cpu() for t in out]

    reference = epoch("device")
    for placement in ("host", "disk"):
        got = epoch(placement)
        assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference)), placement


@GPU_AND_CPU
def test_pretrained_network_fits(image_folder: Path, accelerator: str) -> None:
    main(["fit", "--data", "ImageFolderDataModule", "--data.root", str(image_folder), "--data.val_size", "30",
          "--data.image_size", "64", "--data.placement", "host", "--data.augment", "PhotoAugment",
          "--model.net", "TorchvisionNet", "--model.net.name", "resnet18", "--trainer.accelerator", accelerator,
          "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.logger", "false"])  # fmt: skip
    # 90 training images, batch 32: 2 whole batches (training drops the short last one).
    assert torch.load(best_checkpoint("checkpoints"), weights_only=True)["global_step"] == 2


class SyncCounter(Callback):
    """Counts the CUDA synchronisations (torch's sync debug mode) from the start of a training batch to the start of
    the next, for the batches whose step logs nothing: `syncs[step]`. The last instance made is `SyncCounter.last`."""

    last: SyncCounter | None = None

    def __init__(self) -> None:
        self.syncs: dict[int, int] = {}
        self._open: tuple | None = None
        SyncCounter.last = self

    def _close(self) -> None:
        if self._open is not None:
            step, catcher, caught = self._open
            torch.cuda.set_sync_debug_mode(0)
            catcher.__exit__(None, None, None)
            self.syncs[step] = sum("synchronizing" in str(w.message) for w in caught)
            self._open = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._close()
        step = trainer.global_step
        if 0 < batch_idx < trainer.num_training_batches - 1 and (step + 1) % trainer.log_every_n_steps:
            catcher = warnings.catch_warnings(record=True)
            caught = catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._open = (step, catcher, caught)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._close()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["gpu.yaml", "fast.yaml", "ddp.yaml"])
def test_training_steps_that_log_nothing_never_wait_for_the_gpu(fake_cifar10: Path, config: str) -> None:
    """Between logged steps the host queues step after step without waiting for the GPU: no `.item()`, no copy
    back, no synchronize (Lightning's progress-bar conversion was one at every step: cifar_cli.hooks; fast.yaml's
    EMA was one every 5th step under Lightning's EMAWeightAveraging: cifar_cli.averaging.EMA; ddp.yaml in a world of
    one, LastCheckpoint's broadcast of its time check through NCCL, every step)."""
    with one_process_world():  # (ddp.yaml's)
        main(["fit", "--config", str(REPO / "configs" / config), "--data.data_dir", str(fake_cifar10),
              "--data.val_size", "40", "--data.batch_size", "8", "--trainer.max_epochs", "1",
              "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
              "--trainer.callbacks+=test_gpu.SyncCounter",
              *(["--trainer.devices", "1"] if config == "ddp.yaml" else [])])  # fmt: skip
    counted = SyncCounter.last.syncs
    assert len(counted) >= 8, counted
    assert sum(counted.values()) == 0, counted


@pytest.mark.gpu
def test_stop_vote_waits_for_its_own_step_only(tmp_path: Path) -> None:
    """Preemption's DDP vote on a GPU (NCCL, a world of one process): started without a host sync, and read back
    while GPU work queued after it is still running, so a step never waits for the step queued since."""
    import torch.distributed as dist

    from cifar_cli.callbacks import _StopVote

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", torch.cuda.current_device())
        dist.all_reduce(torch.ones(1, device=device))  # NCCL sets up its communicator at the first collective
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host wait for the GPU below raises
        try:
            side = torch.cuda.Stream(device)  # as Preemption reads its votes
            votes = [_StopVote(True, device, side), _StopVote(False, device, side)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda._sleep(4_000_000_000)  # a kernel of about two seconds, queued behind the votes
        later = torch.cuda.Event()
        later.record()
        assert [vote.result() for vote in votes] == [True, False]
        assert not later.query()  # the votes were read while the later kernel still ran
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
