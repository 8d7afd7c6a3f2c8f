"""Sharded training with PyTorch FSDP2 (`fully_shard`): the frozen base is split across the processes, while
the adapters stay whole on every one.

Why whole: the adapters, the Λ vectors and a head are well under 1 % of a model's parameters, so sharding them
would save next to nothing, while keeping them whole keeps everything AFLoRA computes from them as in one
process or under DDP. Every rank holds the full, averaged gradient of every PM, so the scores of Eqs. 2-4 (a
mean over all of a PM's elements) come out the same on every rank, bit for bit, and Eq. 5 freezes the same PMs
at the same step everywhere; AdamW's state, gradient clipping, the checkpoint and its resume need no gathering.
FSDP's `ignored_params` leaves those parameters to us: `average_gradients` averages their gradients once per
optimizer step, as DDP would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import FsdpConfig, Recipe
from aflora_cli.training.distributed import ProcessGroup

SHARDED_FAMILIES = ("causal_lm",)  # decoder-only models: one kind of block to shard, tested under FSDP


def check_fsdp(recipe: Recipe, family: str, group: ProcessGroup) -> None:
    """Refuse in one line, before the data and the model load, a `training.fsdp` that cannot run as asked."""
    cfg = recipe.training.fsdp
    if cfg is None:
        return
    if family not in SHARDED_FAMILIES:
        raise AfloraError(
            f"training.fsdp: shards decoder-only language models (causal_lm); this task trains a {family} model: "
            "drop training.fsdp (it trains under DDP)"
        )
    if recipe.model.quantization is not None:
        raise AfloraError(
            "training.fsdp: a 4-/8-bit base (model.quantization) cannot be sharded; shard a bf16 base "
            "(model.dtype: bf16) instead, or drop training.fsdp to train the quantized base under DDP"
        )
    if cfg.cpu_offload and group.device.type == "cpu":
        raise AfloraError(
            "training.fsdp.cpu_offload: this run is on the CPU already (nothing to offload to); set it to false"
        )
    if not group.distributed:
        raise AfloraError(
            "training.fsdp: shards the base across processes, but this run is one process (WORLD_SIZE unset or 1); "
            "launch it with `torchrun --nproc-per-node N -m aflora_cli train RECIPE` (or `accelerate launch`), "
            "or drop training.fsdp"
        )


def shard(model: nn.Module, whole: Iterable[nn.Parameter], cfg: FsdpConfig, group: ProcessGroup) -> None:
    """Shard `model` in place: `fully_shard` on each decoder block, then on the root (embeddings, final norm,
    output layer). The parameters in `whole` are left out of every shard and moved to the run's device; the
    sharded ones go there (or stay in CPU memory, with `cpu_offload`) as FSDP places them."""
    keep = set(whole)
    with torch.no_grad():
        for param in keep:
            param.data = param.data.to(group.device)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise AfloraError(
            f"training.fsdp: {type(model).__name__} names no decoder-block class (_no_split_modules) to shard by; "
            "drop training.fsdp"
        )
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    for module in [*blocks, model]:
        fully_shard(
            module,
            mesh=mesh,
            reshard_after_forward=cfg.reshard_after_forward,
            offload_policy=offload,
            ignored_params=keep,
        )


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients of the whole-kept parameters over the processes in one flat all-reduce, each divided
    by the world size and then summed, as DDP does."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.reshape(-1) for grad in grads]).div_(world_size)
    dist.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
