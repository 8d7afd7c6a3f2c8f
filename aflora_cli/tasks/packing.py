"""Packed causal-LM batches: the rows of a micro-batch laid end to end, so little of the batch is padding.

A micro-batch keeps the very rows it would have unpacked (so steps, the schedule and the freezer's step count
do not change); they are laid in order into sequences of at most `training.max_length` tokens, and the
sequences are padded to the longest of them. Each row's position ids start again at 0 and no attention mask
is passed: transformers (5.x, `masking_utils.find_packed_sequence_indices`) then reads the row boundaries from
the position ids and builds a causal mask that never crosses them, for the sdpa, eager and flash attention
implementations alike. The first label of every row is -100, so no row is asked to predict its first token
from the row before; the loss is then the mean over exactly the tokens an unpacked batch takes it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from aflora_cli.errors import AfloraError

IGNORE = -100
Row = dict[str, Any]


def pack_rows(rows: Sequence[Row], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` and `position_ids` of the rows packed in order into sequences of <= max_length."""
    sequences: list[list[Row]] = []
    used = 0
    for row in rows:
        length = len(row["input_ids"])
        if not sequences or used + length > max_length:
            sequences.append([])
            used = 0
        sequences[-1].append(row)
        used += length
    width = max(sum(len(row["input_ids"]) for row in sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        at = 0
        for row in sequence:
            length = len(row["input_ids"])
            ids[i, at : at + length] = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
            labels[i, at + 1 : at + length] = torch.as_tensor(np.asarray(row["labels"][1:], dtype=np.int64))
            positions[i, at : at + length] = torch.arange(length)
            at += length
        positions[i, at:] = torch.arange(width - at)  # the padding is a sequence of its own, with no labels
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@torch.no_grad()
def check_packed_attention(model: nn.Module, device: torch.device) -> None:
    """Refuse packing for a model whose attention would let a packed row see the row before it: two short
    rows packed must give the second one the logits it gets alone."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([[3, 4, 5, 6, 3, 5, 4]], device=device)
        alone = model(input_ids=ids[:, 4:]).logits.float()
        packed = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device))
        packed_second = packed.logits[:, 4:].float()
    finally:
        model.train(was_training)
    if not torch.allclose(alone, packed_second, atol=1e-3, rtol=1e-3):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise AfloraError(
            f"training.packing: {type(model).__name__} (attention implementation {impl}) lets packed rows attend "
            "to each other; turn packing off for this model (training.group_by_length also saves padding)"
        )
