"""Distributed plumbing of the training loop: the process group torchrun asks for, collectives for
metrics and RNG states, and DDP's gradient-sync switch. Single-process runs pass through unchanged."""

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, we_initialised_the_group) from torchrun's environment.

    A process group that already exists (a launcher or test made it) is used and left alone.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available (allowed: auto, cpu, cuda)")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", local_rank if env_world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)  # before the process group, so NCCL binds this rank's GPU

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    if env_world > 1:
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        return dist.get_rank(), dist.get_world_size(), device, True
    return 0, 1, device, False


def all_mean(values: dict[str, float | Tensor], world: int, device: torch.device) -> dict[str, float]:
    """Average scalars over ranks in one collective (one device sync)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    t = torch.stack([torch.as_tensor(v, dtype=dtype, device=device).reshape(()) for v in values.values()])
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return dict(zip(values, t.tolist()))


def gather_rng(generator: torch.Generator, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Every rank's RNG states as ``{"rank0": {...}, ...}`` (collective: all ranks call it)."""
    mine = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {"rank0": mine}
    out: dict[str, Any] = {f"rank{r}": {} for r in range(world)}
    for key, state in mine.items():
        buf = state.to(device)
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf)
        for r, part in enumerate(parts):
            out[f"rank{r}"][key] = part.cpu()
    return out


def restore_rng(rng: dict[str, Any], generator: torch.Generator, rank: int, device: torch.device) -> None:
    mine = rng[f"rank{rank}"]
    have, want = mine["generator"].numel(), generator.get_state().numel()
    if have != want:  # e.g. written when this generator still lived on the GPU (16 bytes; a CPU one has 5056)
        raise ValueError(
            f"the checkpoint's sampler RNG state has {have} bytes, this run's {generator.device.type} generator needs "
            f"{want}: it was written by another version of the loop and cannot resume exactly; start a new output folder"
        )
    torch.set_rng_state(mine["cpu"])
    generator.set_state(mine["generator"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)


@contextmanager
def maybe_no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    with model.no_sync() if skip and isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext():
        yield
