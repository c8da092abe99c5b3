"""Several processes for ``seqpack-bench --nproc N``: the launcher, the process group, DDP and FSDP2.

Launcher: ``torch.multiprocessing.start_processes`` with the spawn start method, from inside
``main()``. The parent parses the arguments and builds the batches once, spawns N fresh processes
(fresh interpreters: their own CUDA context and torch.compile state, none inherited by fork), reads
rank 0's results back and prints the one table, writes the JSON and sets the exit status, so
``seqpack-bench --nproc N`` behaves as the one-process command does, from a shell or from
``cli.main(argv)``. When a process fails, ``ProcessContext.join`` stops the others (SIGTERM, then
SIGKILL) and hands the parent the failed process's traceback; a process whose parent dies gets
SIGINT (spawn sets ``PR_SET_PDEATHSIG``). Nothing is left waiting in a collective either way.
Not torchrun as a subprocess: ``cli.main(argv)`` has no command line to re-execute, the results
would come back only through files, and its elastic agent (restarts, multi-node rendezvous) has
nothing to do on one host. Not ``torch.distributed.launcher.api.elastic_launch``: the same agent
behind an API marked for torchrun's own use.
The processes meet in a ``FileStore`` in a private temporary directory: no port to choose, so no
race with other jobs for a free one (NCCL still opens its own sockets to connect the GPUs).

Launched by torchrun (or anything that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, as a
multi-node job does), the command runs as that one rank, the process group from the environment,
and rank 0 prints.

Failures: a mode's setup (load the model, collate, patch) has no collectives. The ranks agree
after it, so a mode that fails there on any rank is that mode's failed row on every rank, and the
run goes on to the next mode. From the wrapper on, every step has collectives: a rank that fails
there would leave the others waiting in one, so it ends its process, and the launcher (this one,
or torchrun) stops the others.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

SHARDS = ("ddp", "fsdp2")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class Parallel(NamedTuple):
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int  # the device index on this host
    backend: str  # "nccl" on CUDA, "gloo" on the CPU
    shard: str  # "ddp" or "fsdp2"


class RankFailed(RuntimeError):
    """Another rank's failure, as this rank reports it (the failing rank prints the traceback)."""


class LaunchFailed(RuntimeError):
    """A spawned process failed; the message holds its traceback."""


# --------------------------------------------------------------------------- before launching


def torchrun_world() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or the like), else None."""
    if all(name in os.environ for name in _ENV):
        return int(os.environ["WORLD_SIZE"])
    return None


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def unavailable(device: torch.device, shard: str) -> str | None:
    """Why this torch cannot run the requested run, or None."""
    backend = backend_for(device)
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if backend == "gloo" and not dist.is_gloo_available():
        return "this torch build has no gloo backend (needed on the CPU)"
    if backend == "nccl" and not dist.is_nccl_available():
        return "this torch build has no NCCL backend (needed on CUDA)"
    if shard == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            return "--shard fsdp2 needs torch.distributed.fsdp.fully_shard (torch >= 2.6)"
    return None


def launch(fn: Callable[..., None], nproc: int, args: tuple) -> Any:
    """Run ``fn(local_rank, init_method, result_path, *args)`` in ``nproc`` spawned processes.

    Returns:
        what rank 0 pickled to ``result_path``.
    Raises:
        LaunchFailed: a process failed (the others have been stopped); the message says which
            and holds its traceback.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="seqpack-bench-") as tmp:
        init_method = f"file://{os.path.join(tmp, 'rendezvous')}"
        result_path = os.path.join(tmp, "rank0.pkl")
        context = mp.start_processes(
            fn, args=(init_method, result_path, *args), nprocs=nproc, join=False, start_method="spawn"
        )
        try:
            while not context.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # join() stopped the others
            raise LaunchFailed(str(e).strip()) from None
        except BaseException:  # Ctrl-C in the parent: take the processes down with it
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            for process in context.processes:
                process.join()
            raise
        with open(result_path, "rb") as f:
            return pickle.load(f)


def write_result(path: str, payload: Any) -> None:
    with open(path, "wb") as f:
        pickle.dump(payload, f)


# --------------------------------------------------------------------------- in each process


def start(par: Parallel, device: torch.device, init_method: str | None = None) -> None:
    """Join the process group (``init_method`` None: from torchrun's environment); quiet ranks > 0."""
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the NCCL communicator to this rank's GPU up front
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=par.rank, world_size=par.world_size)
    dist.init_process_group(par.backend, **kwargs)
    if par.rank != 0:
        _quiet()


def stop(device: torch.device) -> None:
    """Leave the process group after the run's last collective (not after a failure: the others
    may be waiting in one, and the launcher stops them).

    The models, wrappers and autograd graphs are collected and every rank waits for the others
    before the group goes: without that, about one FSDP2 run in seven on the CPU (torch 2.13,
    gloo) crashed in the interpreter's teardown (SIGABRT or SIGSEGV, with a thread state freed)
    after its results were written; none did in 34 runs with it.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        barrier(device)
        dist.destroy_process_group()


def _quiet() -> None:
    """Rank 0 prints; the others keep only their tracebacks (stderr)."""
    sys.stdout = open(os.devnull, "w")  # for the life of the process
    warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(error: BaseException | None) -> BaseException | None:
    """After a collective-free stretch: None if it went well on every rank, else the same verdict
    everywhere. The first failing rank gets its own exception back (it prints the traceback),
    every other rank a ``RankFailed`` naming that rank and its error."""
    message = None if error is None else "".join(traceback.format_exception_only(error)).strip()
    messages = gather(message)
    failed = [rank for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return None
    rank = dist.get_rank()
    if rank == failed[0]:
        return error
    return RankFailed(messages[failed[0]] if failed[0] == 0 else f"rank {failed[0]}: {messages[failed[0]]}")


def sum_over_ranks(values: list[int]) -> list[int]:
    """Element-wise sum of every rank's ``values`` (one all-reduce)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


# --------------------------------------------------------------------------- the wrappers


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the modules whose class ``model._no_split_modules`` names,
    outermost first (transformers' own FSDP wrapping policy reads the same list)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a block comes before the modules inside it
        if id(module) in inside or type(module).__name__ not in names:
            continue
        layers.append(module)
        inside.update(id(m) for m in module.modules())
    if not layers:
        raise ValueError(
            f"--shard fsdp2: {type(model).__name__} names no decoder layer class (_no_split_modules "
            f"is {sorted(names)}), so it cannot be sharded layer by layer; use --shard ddp"
        )
    return layers


def wrap(model: nn.Module, par: Parallel, device: torch.device, layers: list[nn.Module]) -> nn.Module:
    """DDP, or FSDP2: ``fully_shard`` on each of ``layers``, then on the root. Call after ``patch``,
    so that the modules wrapped or sharded are the compiled layers (nothing is compiled twice)."""
    if par.shard == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model
