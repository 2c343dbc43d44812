"""When one DDP rank fails, every rank exits within seconds and the output names the rank that failed, and why.

Left to Lightning and gloo, a failure is reported haphazardly: the failing rank prints a traceback, its peers die
in a collective with gloo's "Connection closed by peer" (which names an address, not a rank), and on a single node
Lightning's child-process observer SIGKILLs the launching process up to 5 s later, often before it says anything;
a rank killed from outside leaves no word at all. Here the failing rank writes "rank R failed: why" to the process
group's store (a TCPStore served by rank 0) before it exits; a peer whose collective breaks reads it from there,
and the process that launched the node's other ranks reads a killed child's exit status. One line per node names
the failure: the failing rank prints its own; local rank 0 of every other node repeats it; a peer that finds no
record says that it lost contact.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from cifar_cli.callbacks import lightning_takes_signals
from cifar_cli.entry import (
    START_SIGNALS,
    StoppedAfterStage,
    StoppedBeforeStart,
    hand_signals_to_lightning,
    stop_cleanly_after_stage,
)
from cifar_cli.errors import causes, debugging
from cifar_cli.terminal import IGNORED_FOR_THIS_RUN, silence_noise, tensor_core_tip, true_stop_line

# Store key of the first failure: "rank leader message", where leader is the global rank of local rank 0 on the
# failing rank's node.
FAILURE_KEY = "cifar-cli/failure"
# Seconds a peer waits for the failing rank's record, or for a failed child to be reaped: the failing rank writes
# its record before it exits, and gloo reports the broken connection when it exits, so the record is there in
# practice; the wait covers the time a dying process takes to become reapable.
WAIT_S = 2.0
# Seconds between two looks at the launched ranks (Lightning's observer: 5).
POLL_S = 0.5
# Peers that broke off in a collective: gloo's transport errors, and torch's own distributed error types.
_LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout")

# Global ranks and processes of the ranks this process launched (local ranks 1 and up), for the watcher and for
# the main thread's report; empty unless this process is a node's Lightning launcher.
_children: list[tuple[int, subprocess.Popen]] = []
# One report per process: the main thread (a broken collective) and the watcher (a failed child) may both see
# the same failure. Never released: whoever takes it ends the process.
_reporting = threading.Lock()


@dataclass(frozen=True)
class Failure:
    """A failed rank and why; `printed` when its line is already on this node's output."""

    rank: int
    leader: int
    message: str
    printed: bool = False

    def encode(self) -> str:
        return f"{self.rank} {self.leader} {self.message}"

    @classmethod
    def decode(cls, value: bytes, printed_on: int) -> Failure:
        rank, leader, message = value.decode().split(" ", 2)
        return cls(int(rank), int(leader), message, printed=int(leader) == printed_on)


def watch_ranks(trainer: Trainer) -> None:
    """Have Lightning's launcher start `_watch` instead of its own child-process observer.

    Lightning's observer SIGKILLs this process and its children when a child fails, silently and up to 5 s late,
    which can cut short this process's own report. `_watch` names the failed rank (a killed one leaves no record),
    then ends the node's processes the same way.
    """
    if isinstance(trainer.strategy.launcher, subprocess_script._SubprocessScriptLauncher):
        subprocess_script._launch_process_observer = _watch


def carry_spawned_state(trainer: Trainer) -> None:
    """Under ddp_spawn, bring the loops' progress and the checkpoint callbacks' state back from rank 0.

    Lightning's launcher hands the spawning process rank 0's weights, metrics and best checkpoint path only: the
    summary said "0 epochs, step 0", without the best score, and summary.json had no last checkpoint.
    """
    if type(trainer.strategy.launcher) is _MultiProcessingLauncher:
        trainer.strategy.launcher.__class__ = _StateCarryingLauncher  # (pickled to the ranks: a class of its own)


class _StateCarryingLauncher(_MultiProcessingLauncher):
    """Also a SIGTERM to the spawning process (a scheduler's, `kill`) stops the run as under ddp: it goes on to the
    ranks, whose Preemption stops them at the same step, saves last.ckpt and prints the line that resumes, and the
    process exits with 143. The spawning process died at once, with no word, and left the ranks training on. So
    does a SIGUSR1 (SLURM's warning before its time limit, `kill -USR1`), exit code 138, except where it is the
    requeue signal of SLURM's auto_requeue: that one is left as it was, to the ranks' Lightning."""

    _stopped: int | None = None  # in rank 0: the exit code of a stop by a signal (Preemption's), for the launcher
    _stopped_before: int | None = None  # in rank 0: the signal of a stop before training (in the sanity check)
    _signalled: int | None = None  # in the spawning process: the signal passed on to the ranks
    _procs: list = []
    _ignored: list[str] = []  # the messages the spawning process ignores for this run, for the ranks

    @property
    def procs(self) -> list:
        return self._procs

    @procs.setter
    def procs(self, procs: list) -> None:
        # Lightning sets it once the ranks are started: a signal that came while they were being started goes now.
        self._procs = procs
        if self._signalled is not None:
            self._pass_on(self._signalled, None)

    def launch(self, function: Any, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        self._ignored = list(IGNORED_FOR_THIS_RUN)
        if threading.current_thread() is not threading.main_thread():
            return super().launch(function, *args, trainer=trainer, **kwargs)
        hand_signals_to_lightning()  # the start-up's handler (cifar_cli.entry): the ranks take the signals now
        environment = self._strategy.cluster_environment
        requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        requeue_signal = environment.requeue_signal if requeue else None
        signums = [signal.SIGTERM, *([signal.SIGUSR1] if requeue_signal != signal.SIGUSR1 else [])]
        previous = {signum: signal.signal(signum, self._pass_on) for signum in signums}
        try:
            with _without_wandb_service_notice(trainer):
                results = super().launch(function, *args, trainer=trainer, **kwargs)
        except ProcessExitedException as failed:
            # A rank the signal reached before it set up its own handler (still importing torch, say) ended by it:
            # the run is stopped before training, as a process alone is by a SIGTERM then, not failed.
            if self._signalled is not None and failed.exit_code in (-self._signalled, 128 + self._signalled):
                raise StoppedBeforeStart(self._signalled) from None
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        stage = trainer.state.fn.value if trainer is not None and trainer.state.fn is not None else "fit"
        if self._signalled is not None:
            # Passed on once the ranks' stage had ended (W&B's checkpoint versions, in on_fit_end): they finished
            # it and sent their results; the command ends here, as a process alone does then.
            raise StoppedAfterStage(self._signalled, stage)
        stop_cleanly_after_stage(stage)  # (the ranks' teardown put it in place in their processes, not here)
        return results

    def _pass_on(self, signum: int, frame: Any) -> None:
        self._signalled = signum
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    def _wrapping_function(self, process_idx: int, trainer: Trainer | None, function: Any, *args: Any) -> None:
        # A spawned rank starts a new interpreter, without the warning filters the command set in its own: a resumed
        # run's ranks warned that Lightning would delete its metrics.csv (which cifar-cli keeps).
        silence_noise()
        for message in self._ignored:
            warnings.filterwarnings("ignore", message=message)
        if trainer is not None:  # as the spawning process has it (CifarCLI.instantiate_trainer)
            tensor_core_tip(trainer.precision)
        # The signal handling the command set up in its own interpreter (cifar_cli.callbacks): without it, a SIGUSR1
        # passed on in `validate` and a signal passed on after the rank's stage had ended killed the rank.
        lightning_takes_signals(spawned_rank=True)
        if self._start_method == "fork":
            # A forked rank inherits the handler that passes signals on from the spawning process: Lightning took
            # it for a user's own and left SIGUSR1 to it, which passed nothing on from here: a SIGUSR1 to a rank was
            # ignored, and the run trained on to its end. Their default action, as a spawned rank starts with.
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                if getattr(signal.getsignal(signum), "__func__", None) is _StateCarryingLauncher._pass_on:
                    signal.signal(signum, signal.SIG_DFL)
            # GNU OpenMP (torch's CPU threads on Linux) cannot start its threads again in a forked process once the
            # parent has used them: the rank waited forever at its first parallel operation (ddp_fork, 1 device of a
            # 2-core CPU, an image folder decoded in the parent; Lightning gave the rank 2 threads). One thread a
            # rank, set before Lightning's choice, which leaves a set OMP_NUM_THREADS alone.
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                # Lightning's stop line is logged here, by rank 0: the filter the spawning process set is not in
                # this interpreter.
                with true_stop_line(trainer) if trainer is not None else contextlib.nullcontext():
                    return function(*args, **kwargs)
            except SIGTERMException as stop:
                # What Lightning does with it around `trainer.fit` in the process that calls it, here the
                # spawning one: Preemption's on_exception saves last.ckpt, says how to resume and sets the code.
                # The rank then ends as after a finished fit, so that its results reach the spawning process.
                _interrupt(trainer, stop)
                trainer._teardown()
                self._stopped = stop.code if isinstance(stop.code, int) else 128 + signal.SIGTERM
                return None
            except StoppedBeforeStart as stop:
                # Preemption's, as the sanity check ends: every rank stops alike, and the spawning process says so.
                _interrupt(trainer, stop)
                trainer._teardown()
                self._stopped_before = stop.signum
                return None

        super()._wrapping_function(process_idx, trainer, run, *args)

    def get_extra_results(self, trainer: Trainer) -> dict[str, Any]:
        state = {"fit_loop": trainer.fit_loop.state_dict(), "checkpoints": [c.state_dict() for c in
                 trainer.checkpoint_callbacks], "swa": [_swa_pass(c) for c in trainer.callbacks
                 if isinstance(c, StochasticWeightAveraging)]}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(state, buffer)  # as bytes, as Lightning sends the metrics: tensors would share memory
        return {**super().get_extra_results(trainer), "cifar_cli_state": buffer.getvalue(),
                "cifar_cli_stopped": self._stopped, "cifar_cli_stopped_before": self._stopped_before}  # fmt: skip

    def update_main_process_results(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if extra.get("cifar_cli_stopped_before"):
            raise StoppedBeforeStart(extra["cifar_cli_stopped_before"])  # cli.main says so
        if extra.get("cifar_cli_stopped"):
            raise SystemExit(extra["cifar_cli_stopped"])  # rank 0 has said how to resume
        state = torch.load(io.BytesIO(extra["cifar_cli_state"]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        # What SWA learns as training starts (whether it adds a BatchNorm pass, after how many epochs): the summary
        # counted the pass as an epoch ("2 epochs" for a run of 1).
        swa = [c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)]
        for callback, (batch_norm, epochs) in zip(swa, state.get("swa", [])):
            callback._model_contains_batch_norm, callback._max_epochs = batch_norm, epochs  # private (Lightning 2.6)
        for callback, saved in zip(trainer.checkpoint_callbacks, state["checkpoints"]):
            # The folder rank 0 resolved at set-up, which this process never ran: load_state_dict keeps the best
            # score and the last checkpoint only where the folders agree.
            callback.dirpath = saved["dirpath"]
            callback.load_state_dict(saved)


@contextlib.contextmanager
def _without_wandb_service_notice(trainer: Trainer | None) -> Iterator[None]:
    """Lightning's WandbLogger calls `wandb.require("service")` as the ranks are spawned (it is pickled for them),
    and wandb 0.19 and later answer each time that the call does nothing: "wandb: WARNING `wandb.require('service')`
    is a no-op as it is now the default behavior", on every ddp_spawn run with W&B, about code the user cannot
    change. That line is dropped by its text, so a wandb whose call still does something, and says nothing, is
    untouched."""
    if trainer is None or not any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        yield
        return
    import wandb

    termwarn = wandb.termwarn

    def termwarn_but_the_notice(string: str, *args: Any, **kwargs: Any) -> None:
        if "wandb.require('service')" not in str(string):
            termwarn(string, *args, **kwargs)

    wandb.termwarn = termwarn_but_the_notice
    try:
        yield
    finally:
        wandb.termwarn = termwarn


def _swa_pass(callback: StochasticWeightAveraging) -> tuple[bool, int | None]:
    return bool(getattr(callback, "_model_contains_batch_norm", False)), getattr(callback, "_max_epochs", None)


def exit_if_rank_failed(err: BaseException, usage: str | None) -> None:
    """Under DDP, report this rank's failure, or the peer's failure that broke this rank, and exit.

    Returns without doing anything when no process group with other ranks is up. With JSONARGPARSE_DEBUG set it
    records the failure for the peers and returns, for the caller to raise it with its traceback.

    Args:
        err: The error that ended this rank's run.
        usage: `err`'s one-line summary when it is bad input (exit code 2); otherwise its first line is used.
    """
    if _reporting.locked():
        # The rank watcher is reporting a launched rank's failure and ending this process; closing the process
        # group, it broke this thread's collective, which raised `err`. Nothing to add: neither a second line nor
        # the traceback the caller would print once the group is gone (seen once, in a full test run on 2 cores).
        _reporting.acquire(timeout=15)
        os._exit(1)
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    rank = dist.get_rank()
    leader = rank - int(os.environ.get("LOCAL_RANK", 0))
    debug = debugging()  # failures are recorded but not summarised
    store = _store()
    if _lost_contact(err):
        failure = _find_failure(store, leader)
        if debug:
            return
        if failure is None:
            _exit(f"rank {rank} lost contact with the other ranks ({_first_line(err)})", 1)
        if failure == "store lost":
            _exit(f"rank {rank} lost contact with rank 0, which holds the run's store: rank 0 failed or was killed", 1)
        # One line a node: from the failing rank itself, or from local rank 0 of every other node.
        _exit(None if failure.printed or rank != leader else f"rank {failure.rank} failed: {failure.message}", 1)
    failure = Failure(rank, leader, usage or f"{type(err).__name__}: {_first_line(err)}")
    try:
        # compare_set, not set: the first failure stays recorded, and the answer confirms the store has it.
        store.compare_set(FAILURE_KEY, "", failure.encode())
    except Exception:  # rank 0 and its store are gone already: the report below still stands
        pass
    if not debug:
        _exit(f"rank {rank} failed: {failure.message}", 2 if usage else 1)


def exit_if_spawned_rank_failed(err: BaseException) -> None:
    """Under ddp_spawn, in the process that started the ranks: name the rank that failed, and why, in one line.

    torch's spawn reports a rank's failure as an exception holding the rank's traceback as text (the rank itself
    prints nothing), which was printed whole inside the launching process's own traceback. Returns where `err` is
    no such failure, or with JSONARGPARSE_DEBUG set.
    """
    failed = next((e for e in causes(err) if isinstance(e, ProcessException)), None)
    if failed is None or debugging():
        return
    if isinstance(failed, ProcessExitedException):
        why = _exit_status(failed.exit_code)  # negative: the signal that killed it
    else:
        why = _raised(failed.msg)
    # The index of the spawned process: the rank on one node, the local rank on several.
    _exit(f"rank {failed.error_index} failed: {why}", 2 if why.startswith("UsageError: ") else 1)


def _raised(trace: str) -> str:
    """`Type: message` (the first line of the message) of the exception a traceback's text ends with."""
    lines = trace.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    raised = [line for line in lines[frames[-1] + 1 :] if line and not line[0].isspace()] if frames else []
    name, _, message = (raised[0] if raised else lines[-1]).partition(": ")
    name = name.rsplit(".", 1)[-1]  # cifar_cli.errors.UsageError -> UsageError, as the other ranks' lines say
    return f"{name}: {message}" if message else name


def _store() -> dist.Store:
    store = dist.distributed_c10d._get_default_store()
    # Its timeout is the process group's, 30 minutes: a store whose server died must not hold the exit up.
    store.set_timeout(timedelta(seconds=WAIT_S))
    return store


def _lost_contact(err: BaseException) -> bool:
    """Whether `err` (or an error behind it) is a collective broken off by a peer."""
    return any(
        isinstance(error, dist.DistError) or any(text in str(error) for text in _LOST_CONTACT) for error in causes(err)
    )


def _find_failure(store: dist.Store | None, leader: int) -> Failure | str | None:
    """The recorded failure, or a launched rank that died without one; "store lost" when rank 0 is gone."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if store is not None and store.check([FAILURE_KEY]):
                return Failure.decode(store.get(FAILURE_KEY), printed_on=leader)
        except Exception:  # the store's server, rank 0, is gone
            return "store lost"
        for rank, proc in _children:
            if proc.poll():
                # It may have recorded its failure just before the check above.
                if store is not None and store.check([FAILURE_KEY]):
                    return Failure.decode(store.get(FAILURE_KEY), printed_on=leader)
                return Failure(rank, leader, _exit_status(proc.returncode))
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _exit_status(code: int) -> str:
    if code - 128 in (*START_SIGNALS, signal.SIGINT):
        # The clean stop of a rank sent a signal of its own while the ranks start (its line is local rank 0's
        # alone): a signal to one rank is agreed on by all only once the trainer has taken the signals.
        name = signal.Signals(code - 128).name
        return f"stopped by {name}, sent to it alone; a signal sent to rank 0 or to every rank stops the run cleanly"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}, without a report (out of memory, or killed by hand)"
    return f"exited with code {code} without a report"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _exit(line: str | None, code: int, thread: bool = False) -> None:
    """Print `line` as the run's error, end the ranks this process launched, and exit with `code`."""
    if not _reporting.acquire(timeout=10 if thread else -1):
        os._exit(code)  # the main thread has been exiting for 10 s: stuck in a destructor
    if line:
        print(f"cifar-cli: error: {line}", file=sys.stderr, flush=True)
    # SIGKILL, as Lightning's observer: a process blocked in a collective does not act on SIGTERM.
    for _, proc in _children:
        if proc.poll() is None:
            proc.kill()
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        # Closes this rank's connections now, so that a peer waiting in a collective stops at once rather than
        # when this process ends. (NCCL's destroy may wait on the peers' collectives: left to the exit there.)
        dist.destroy_process_group()
    if not thread:
        atexit._run_exitfuncs()  # the W&B run ends as failed, log files are closed
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: tearing down the interpreter with torch and Lightning loaded took 7 s on a busy 2-core machine.
    os._exit(code)


def _watch(child_processes: list[subprocess.Popen]) -> None:
    """Start watching the ranks this process launched; Lightning calls it right after launching them."""
    # Lightning's launcher: global rank = node rank x processes per node + local rank; NODE_RANK was just set.
    first = int(os.environ.get("NODE_RANK", 0)) * (len(child_processes) + 1)
    _children[:] = [(first + i + 1, proc) for i, proc in enumerate(child_processes)]
    threading.Thread(target=_watch_loop, args=(first,), daemon=True, name="cifar-cli-rank-watcher").start()


def _watch_loop(leader: int) -> None:
    while True:
        time.sleep(POLL_S)
        codes = [proc.poll() for _, proc in _children]
        if all(code == 0 for code in codes):
            return
        if any(codes):
            store = _store() if dist.is_available() and dist.is_initialized() else None
            failure = _find_failure(store, leader)
            if isinstance(failure, Failure):
                line = None if failure.printed else f"rank {failure.rank} failed: {failure.message}"
            else:
                line = "a rank this process launched failed"  # not reached: a failed child is found above
            _exit(line, 1, thread=True)
