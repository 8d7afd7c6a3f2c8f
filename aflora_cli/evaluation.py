"""Scoring a model on a tokenized split with the task's metric."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from aflora_cli.data import TaskSpec, make_collator
from aflora_cli.metrics import compute_metrics


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every row of `dataset`, in order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=make_collator(tokenizer))
    logits, labels = [], []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(**{key: value for key, value in batch.items() if key != "labels"})
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: nn.Module,
    splits: dict[str, Dataset],
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """The task's metrics on each named split."""
    results = {}
    for name, dataset in splits.items():
        logits, labels = predict(model, dataset, tokenizer, batch_size, device)
        results[name] = compute_metrics(spec, logits, labels)
    return results
