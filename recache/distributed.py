"""Data parallelism with ``torch.distributed``, started by ``torchrun`` (or ``--nproc``, which calls it).

Every rank runs the same program on its own shard of the (condition, seed) pairs; the few collectives below join the
ranks: gradient sums for training, loss sums for search, gathered rows for evaluation. Only rank 0 writes files and
shows progress. Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op on one rank.

A rank that dies ends the run: gloo raises on the survivors' next collective, and torchrun sends them SIGTERM; both
become ``RankLost``, so each survivor stops with one line and whatever it was writing is left whole (writes are
atomic).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from recache.errors import RecacheError

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a rank that is alive but stuck (torch's default)
_stopped: list[str] = []  # the launcher's SIGTERM, once it came: the next collective raises it if it was swallowed


class RankLost(RecacheError):
    """Another rank died or the launcher stopped this one; the run cannot go on."""


def init() -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU); True when
    distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
        sys.unraisablehook = _quiet_when_stopped
        _stop_with_launcher()
        nccl = torch.cuda.is_available() and dist.is_nccl_available()
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if nccl else "gloo", timeout=TIMEOUT)
    return True


def _stop_with_launcher() -> None:
    """On Linux, ask the kernel for SIGTERM when the launcher (torchrun's agent, this rank's parent) dies, even by
    SIGKILL: a rank then stops as it does when torchrun stops it, instead of running on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher was already gone
        os.kill(os.getpid(), signal.SIGTERM)


def max_processes() -> int:
    """The most ranks ``--nproc`` may start on this machine: one per GPU, else one per CPU core."""
    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def check_nproc(nproc: int) -> None:
    most = max_processes()
    if nproc > most:
        what = "GPUs" if torch.cuda.is_available() else "CPU cores"
        raise RecacheError(f"--nproc {nproc} is more than the {most} {what} of this machine; use at most {most}")


def _stopped_by_launcher(signum, frame):
    _stopped.append(f"rank {rank()} was stopped by the launcher (SIGTERM): "
                    "another rank failed or the run was cancelled")
    raise RankLost(_stopped[-1])


def _quiet_when_stopped(unraisable) -> None:
    """A SIGTERM that lands in a finalizer (tqdm closing a bar, a weakref callback) cannot stop the rank there: Python
    would print its traceback as "Exception ignored" and go on. Keep that quiet; the next collective raises it."""
    if not isinstance(unraisable.exc_value, RankLost):
        sys.__unraisablehook__(unraisable)


def barrier() -> None:
    """Wait until every rank is here."""
    if is_distributed():
        _collective("barrier", dist.barrier)


def close() -> None:
    """Leave the process group once every rank is done (rank 0 may still be writing when the others finish)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that writes files and shows progress."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(n: int) -> slice:
    """This rank's block of ``n`` items (``block``)."""
    return block(n, rank(), world_size())


def block(n: int, r: int, w: int) -> slice:
    """Rank r of w holds items ``n r // w`` up to ``n (r + 1) // w``: contiguous, in rank order, sizes within one."""
    return slice(n * r // w, n * (r + 1) // w)


def _collective(name: str, op, tensor: torch.Tensor | None = None):
    """Run a collective; a rank lost on the way becomes ``RankLost`` (gloo reports it as a RuntimeError)."""
    if _stopped:
        raise RankLost(_stopped[-1])
    on = tensor.to(_wire()) if tensor is not None else None
    try:
        op(on) if on is not None else op()
    except RankLost:
        raise
    except (RuntimeError, dist.DistError) as e:
        # gloo: "[file:line] why. hint"
        reason = re.sub(r"^\[[^\]]*\] ", "", str(e).splitlines()[0] if str(e) else type(e).__name__).split(". ")[0]
        raise RankLost(f"rank {rank()} lost contact with another rank during {name} ({reason})") from None
    return on


def _wire() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (the tensor itself on one rank)."""
    if not is_distributed():
        return tensor
    summed = _collective("all_reduce", dist.all_reduce, tensor)
    return summed.to(tensor.device)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (its shard, any number of rows) concatenated in rank order along dim 0."""
    if not is_distributed():
        return tensor
    wire, w = _wire(), world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=wire) for _ in range(w)]
    _collective("all_gather", lambda t: dist.all_gather(sizes, t), torch.tensor([len(tensor)]))
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty(padded.shape, dtype=padded.dtype, device=wire) for _ in range(w)]
    _collective("all_gather", lambda t: dist.all_gather(parts, t), padded)
    return torch.cat([p[:s].to(tensor.device) for p, s in zip(parts, sizes, strict=True)])


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (JSON-like rows, small) in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    _collective("all_gather_object", lambda: dist.all_gather_object(out, obj))
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (what rank 0 read from disk, so other ranks need not see its files)."""
    if not is_distributed():
        return obj
    box = [obj]
    _collective("broadcast_object_list", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def on_main(fn):
    """``fn()`` run on rank 0 only (reading files, checking them), its result given to every rank. A ``RecacheError``
    it raises is raised on every rank, marked ``shown_by_main`` on the others so the CLI prints it once."""
    if not is_distributed():
        return fn()
    outcome = None
    if is_main():
        try:
            outcome = {"result": fn()}
        except RecacheError as e:
            outcome = {"error": str(e)}
    outcome = broadcast_from_main(outcome)
    if "error" in outcome:
        error = RecacheError(outcome["error"])
        error.shown_by_main = not is_main()
        raise error
    return outcome["result"]


def sum_gradients(parameters) -> None:
    """Replace every gradient by its sum over the ranks (one flat all-reduce)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.flatten() for g in grads]))
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def launch(nproc: int, argv: list[str], command: str) -> int:
    """``torchrun --standalone --nproc-per-node NPROC -m recache ARGV`` (``--nproc``), in this process; the exit status.

    Each worker gets ``OMP_NUM_THREADS`` = cores / NPROC unless it is set. A rank that fails is named on one line;
    torchrun stops the others, which say so themselves."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report is replaced by ours
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "recache",
                                          *_without_nproc(argv)]))
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        if all(f.exitcode == 2 for _, f in failures):  # a user error, which the ranks have printed
            return 2
        how = [f"rank {r} "
               f"{'was killed by ' + f.signal_name() if f.exitcode < 0 else f'exited with status {f.exitcode}'}"
               for r, f in failures]
        print(f"recache {command}: {', '.join(how)} (of {nproc} ranks); the run stopped", file=sys.stderr)
        return 1
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` (or ``--nproc=N``, or an abbreviation): the workers' arguments."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) > 3 and "--nproc".startswith(name):
            skip = "=" not in token
        else:
            out.append(token)
    return out
