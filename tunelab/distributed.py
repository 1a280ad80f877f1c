"""Multi-process runs: who am I, who writes, and how eval shards its samples and gathers them back.

tunelab does not launch processes itself: `torchrun` or `accelerate launch` starts one process per
device and describes the group in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).

    torchrun --nproc_per_node 8 -m tunelab train examples/train_lora.yaml                  # DDP, NCCL on GPUs
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m tunelab train examples/train_lora.yaml --ddp_backend gloo   # CPU
    accelerate launch --config_file examples/accelerate/fsdp.yaml -m tunelab train examples/train_lora.yaml
    torchrun --nproc_per_node 8 -m tunelab predict --checkpoint_dir runs/x ...   # sharded eval

Training needs nothing from here beyond `setup` and `is_main`: HF's Trainer runs DDP / DeepSpeed / FSDP.
Eval and predict do not use the Trainer (they generate), so they shard by hand: rank r scores samples
r, r + W, r + 2W, ... (strided, so every rank gets a similar mix of lengths when the data is ordered)
and `gather_in_order` puts the answers back in data-set order on every rank. Only rank 0 writes files.

Everything here works unlaunched too: one process is rank 0 of a world of 1, and gathering is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


def _group():
    """torch.distributed when a process group is up, else None (torch is imported only if already loaded)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the run: the process group's size, else the launcher's WORLD_SIZE, else 1."""
    dist = _group()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    dist = _group()
    return dist.get_rank() if dist else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """True in the one process that writes run files, results, plots and predictions (global rank 0)."""
    return rank() == 0


def setup(training) -> tuple[Any, Any]:
    """Join the process group the launcher describes, through HF's TrainingArguments (which builds
    accelerate's PartialState: NCCL on GPUs, gloo on CPUs, the device of this rank); returns (the training
    options to run with, this rank's device). Unlaunched this only picks the device."""
    import torch

    if not torch.cuda.is_available() and not training.use_cpu:
        # accelerate forms a CPU (gloo) group only when told the CPU is the device
        training = dataclasses.replace(training, use_cpu=True)
    return training, training.device


def barrier() -> None:
    """Wait for every rank (a no-op in one process). Used so that no rank checks a directory that rank 0
    has begun to write into."""
    dist = _group()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def leave() -> None:
    """Leave the process group, if this process is in one, once its command is done. Every collective of
    the command has completed by then. Left to the interpreter's exit, gloo's worker threads were torn
    down by static destructors, and now and then a rank that had finished its work aborted there
    ("terminate called without an active exception", SIGABRT) and failed the whole launch."""
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()


# ---- sharded eval: pure index arithmetic, then one collective ----

def shard_indices(n: int, rank_: int, world: int) -> list[int]:
    """The samples rank `rank_` of `world` handles: every world-th sample from its rank (strided)."""
    return list(range(rank_, n, world))


def merge_shards(shards: list[list[Any]], n: int) -> list[Any]:
    """Inverse of shard_indices: shards[r] holds rank r's results in its own order -> one list of n."""
    out: list[Any] = [None] * n
    for r, values in enumerate(shards):
        indices = shard_indices(n, r, len(shards))
        if len(values) != len(indices):
            raise ValueError(f"rank {r} returned {len(values)} results for {len(indices)} samples")
        for i, value in zip(indices, values):
            out[i] = value
    return out


def my_shard(n: int) -> list[int]:
    """The indices of n samples this process handles."""
    return shard_indices(n, rank(), world_size())


def all_gather(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object); [obj] in one process."""
    dist = _group()
    if not dist or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(values: list[Any], n: int) -> list[Any]:
    """This rank's results for `my_shard(n)` -> all n results in data-set order, on every rank."""
    return merge_shards(all_gather(values), n)
