"""Data-parallel training (DDP): gloo on CPU, nccl on CUDA. Only rank 0 writes files.

    torchrun --nproc_per_node 2 -m retina_core train --model oct_resnet18 --data data/oct --out runs/oct
    engine.spawn_train(2, "oct_resnet18", "data/oct", "runs/oct", TrainConfig(epochs=1))   # the same without torchrun

`setup()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and returns None
for a single process, so the engine runs unchanged without it. Each rank draws its own shard of the training split
(DistributedSampler, drop_last so every rank takes the same number of steps); gradients are averaged by DDP, so the
replicas stay identical; validation runs on rank 0 and its score is broadcast, so every rank takes the same
early-stopping decision.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistContext | None:
    """Join the process group described by the environment; None when WORLD_SIZE is absent or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(minutes=30))
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return DistContext(rank, dist.get_world_size(), local_rank, device, backend)


def cleanup(ctx: DistContext | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: nn.Module, ctx: DistContext | None) -> nn.Module:
    """DDP-wrapped module (or `net` itself for one process). Unwrap with `unwrap` for state dicts and evaluation."""
    if ctx is None:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if hasattr(net, "module") and isinstance(getattr(net, "module"), nn.Module) else net


def sampler(ds: Dataset, ctx: DistContext, seed: int) -> DistributedSampler:
    return DistributedSampler(ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                              drop_last=True)


def broadcast(obj, ctx: DistContext | None):
    """rank 0's `obj` on every rank (pickled; small objects only)."""
    if ctx is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(net: nn.Module, ctx: DistContext | None) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks. DDP broadcasts rank 0's
    buffers at the start of each forward, so after the last step every rank holds its own update; call this
    before evaluating or saving so the replicas are identical."""
    if ctx is None:
        return
    for b in unwrap(net).buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
            b.data.div_(ctx.world_size)


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None:
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def state_digest(net: nn.Module, params_only: bool = False) -> str:
    """sha256 of every tensor of the state dict (name, dtype, bytes), or of the parameters only: equal digests mean
    identical replicas."""
    h = hashlib.sha256()
    m = unwrap(net)
    items = m.named_parameters() if params_only else m.state_dict().items()
    for k, v in sorted(items):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
