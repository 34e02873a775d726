"""Training across processes with torch.distributed as torchrun launches it: which process this is, and the few
collective steps train.py takes (join, sum across ranks, share rank 0's state, leave).

One process (plain `python train.py`) is world size 1, and every function here is then a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import ConfigError

# How long a rank waits in a collective for the others before failing: long enough for rank 0 to download or
# decode a dataset while the others wait at the barrier. A rank that dies is noticed by torchrun at once; this
# only bounds a hang.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group, from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_*)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, logs to MLflow and writes files."""
        return self.rank == 0


def from_env(env=os.environ) -> Ranks:
    try:
        return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                     int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun sets them): {e}") from None


def join(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not ranks.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None, store=restart_safe_store(ranks),
                                rank=ranks.rank, world_size=ranks.world)
    return device


def restart_safe_store(ranks: Ranks, env=os.environ) -> dist.Store | None:
    """torchrun's store, with the restart number as a key prefix, on one machine; None otherwise (env:// then).

    After a worker dies, torchrun --max-restarts starts the group again on the same store (torch 2.14, with
    --standalone at least), where the dead processes' gloo addresses are still written: the new ranks connect to
    them and fail. A prefix per attempt gives every restart clean keys. Across machines each torchrun counts its
    own restarts (a node restarted because another failed does not count), so the numbers may disagree there:
    torch's own store is used, as it is.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in env or ranks.local_world != ranks.world:
        return None
    serves_itself = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # else torchrun's agent hosts it
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), ranks.world,
                          is_master=serves_itself and ranks.main, timeout=TIMEOUT)
    return dist.PrefixStore(f"attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def check_restarts(ranks: Ranks, env=os.environ) -> None:
    """Refuse, before joining, a run that would hang at its first fault: torchrun across machines with
    --max-restarts, on the rendezvous store torch shares with the workers (its default). A group restarted on it
    finds the dead workers' addresses still written there and waits for them (seen here with two torchruns on one
    machine: the restarted group hung until killed). With c10d rendezvous, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    gives every restart a fresh store; on one machine restart_safe_store does the same from inside."""
    if ranks.local_world == ranks.world or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if env.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0"):
        raise ConfigError("torchrun across machines with --max-restarts: use --rdzv-backend=c10d and set "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every machine (the "
                          "static rendezvous of --master-addr always shares its store). Otherwise workers restarted "
                          "after a fault wait forever for the dead ones, whose addresses stay in that store")


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `tensor` over all ranks, in place (unchanged in one process)."""
    if not active():
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces GPU memory only
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def share(obj):
    """Rank 0's `obj` on every rank (pickled between our own processes only; never data from outside)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
