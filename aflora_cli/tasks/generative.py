"""What the two text families share: loading text rows, the loss of a split, and generation with its metric.

The families differ only in how a rendered row becomes tokens (`encode`), which transformers class holds the
model, and how many target tokens a batch's loss averages over; everything else is here.

Every evaluation reports the loss on the split's response tokens (teacher-forced, averaged over tokens) and
its perplexity exp(loss), then generates a response for each row (greedy unless `eval.num_beams` > 1,
batched) and scores it with the task's metric (`text_metrics.py`).
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aflora_cli.engine import base_model
from aflora_cli.engine.storage import BaseStorage
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import Recipe
from aflora_cli.tasks import Prediction, Progress, Row, Task, TaskData
from aflora_cli.tasks.encoded_cache import (
    EncodedRows,
    cache_key,
    file_digest,
    read_cached,
    tokenizer_digest,
    write_cached,
)
from aflora_cli.tasks.generation import GenerationSettings, generate
from aflora_cli.tasks.text_data import (
    TextRow,
    TextSpec,
    file_row_chunks,
    hub_identity,
    hub_split,
    resolve_spec,
    row_chunks,
    split_file,
    split_source,
    user_row,
)
from aflora_cli.tasks.text_metrics import METRICS

IGNORE = -100  # the label of a token the loss skips


class TextTask(Task):
    """A task whose rows pair a prompt with a response, learned by a language model."""

    def __init__(self, recipe: Recipe, spec: TextSpec) -> None:
        super().__init__(recipe)
        self.spec = spec
        self.metric = METRICS[spec.metric]

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> TextTask:
        return cls(recipe, resolve_spec(recipe.data))

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], recipe: Recipe) -> TextTask:
        return cls(recipe, TextSpec.from_dict(entry))

    @property
    def main_metric(self) -> str:
        return self.metric.main

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            **self.spec.to_dict(),
            "main_metric": self.main_metric,
            "metrics": ["loss", "perplexity", *self.metric.names],
        }

    def load_model(
        self,
        model_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        storage: BaseStorage | None = None,
        device: torch.device | None = None,
    ) -> nn.Module:
        import transformers

        auto = getattr(transformers, self.auto_class)
        stored = storage or BaseStorage()
        model: nn.Module = base_model.load_or_fail(lambda: stored.from_pretrained(auto, model_dir, device), model_dir)
        return model

    # ---- data -------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> Row | None:
        """Token ids (`input_ids`, `labels` with IGNORE where no loss is taken) and `prompt_ids`, the input a
        generation starts from; None when the row cannot keep a single response token within the limits."""

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse settings the tokenizer cannot honour, before any row is read."""
        if self.spec.chat_template and not getattr(tokenizer, "chat_template", None):
            key = "format: chat" if self.spec.format == "chat" else "chat_template: true"
            raise AfloraError(
                f"data.{key}: the tokenizer of {tokenizer.name_or_path} has no chat template; "
                "use a model that has one, or a prompt_template instead"
            )

    def load_splits(self, tokenizer: PreTrainedTokenizerBase, splits: Sequence[str] | None = None) -> TaskData:
        self.check_tokenizer(tokenizer)
        available = ["train", *self.spec.eval_splits]
        for split in splits or ():
            if split not in available:
                raise AfloraError(
                    f"split {split!r}: not a split of task {self.name!r}; available: {', '.join(available)}"
                )
        encoded: dict[str, Sequence[Row]] = {}
        skipped: dict[str, int] = {}
        why_skipped: dict[str, str] = {}
        uncached: dict[str, str] = {}
        cfg = self.recipe.data
        for split in splits if splits is not None else available:
            # the train split is scored only when it is asked for by name (`aflora eval --split train`)
            scored = split != "train" or splits is not None
            source = split_source(self.spec, cfg, split)
            file = split_file(cfg, split)
            limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
            hub = hub_split(self.spec, split) if file is None else None  # loaded once: named and read
            chunks = functools.partial(row_chunks, self.spec, cfg, split, self.data_seed, hub)
            subset = {"limit": limit, "seed": self.data_seed} if limit is not None else None
            origin = {"file": file_digest(file)} if file is not None else hub_identity(self.spec, split, hub)
            encoded[split], prompt_lengths, not_written = self._prepare(
                chunks, tokenizer, source, scored, origin, subset
            )
            skipped[split] = len(prompt_lengths)
            if prompt_lengths:
                why_skipped[split] = self._why_skipped(prompt_lengths, source)
            if not_written:
                uncached[split] = not_written
        return TaskData(encoded.pop("train", None), encoded, skipped, why_skipped, uncached)

    def load_file(self, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Sequence[Row]:
        self.check_tokenizer(tokenizer)
        chunks = functools.partial(file_row_chunks, self.spec, path)
        encoded, skipped, _ = self._prepare(chunks, tokenizer, str(path), True, {"file": file_digest(path)}, None)
        if not encoded:
            raise AfloraError(f"{path}: no row fits within the length limits ({self._why_skipped(skipped, str(path))})")
        return encoded

    def _prepare(
        self,
        chunks: Callable[[], Iterator[list[TextRow]]],
        tokenizer: PreTrainedTokenizerBase,
        source: str,
        scored: bool,
        origin: dict[str, Any] | None,
        subset: dict[str, int] | None,
    ) -> tuple[EncodedRows, list[int], str | None]:
        """A split's encoded rows, the prompt lengths of the rows left out, and why a fresh encoding could not be
        cached (None when it was, or came from the cache): from the cache when the split's `origin` (a local
        file's digest, a Hub split's fingerprint) was encoded before with the same settings, else read, checked
        and encoded chunk by chunk (then cached; a split of no known origin is not cached)."""
        key = self._cache_key(origin, tokenizer, scored, subset) if origin is not None else None
        if key is not None and (cached := read_cached(key)) is not None:
            return (*cached, None)
        tables, skipped = [], []
        for rows in chunks():
            if scored:
                self.check_references(rows, source)
            kept, lengths = self._encode_all(rows, tokenizer, source, scored)
            tables.append(EncodedRows.from_rows(kept, text_columns=scored).table)
            skipped += lengths
        encoded = EncodedRows(pyarrow.concat_tables(tables))
        del tables
        return encoded, skipped, None if key is None else write_cached(key, encoded, skipped)

    def _cache_key(
        self, origin: dict[str, Any], tokenizer: PreTrainedTokenizerBase, scored: bool, subset: dict[str, int] | None
    ) -> str:
        """Everything that changes a split's encoded rows (see `encoded_cache`)."""
        training = self.recipe.training
        limits = (training.max_length, training.max_source_length, training.max_target_length)
        return cache_key(
            {
                **origin,
                "tokenizer": tokenizer_digest(tokenizer),
                "family": self.family,
                "spec": {**self.spec.to_dict(), "eval_splits": None},
                "limits": limits,
                "scored": scored,
                "subset": subset,
            }
        )

    def check_references(self, rows: Sequence[TextRow], source: str) -> None:
        """Every reference must be one the metric can read (a GSM8K `#### N`, a number), checked when the data is
        read so that a bad row stops the run before any model is loaded; the message names file and row."""
        for number, row in enumerate(rows, start=1):
            try:
                self.metric.answer(row.reference)
            except AfloraError as err:
                raise AfloraError(f"{row.where or f'{source}: row {number}'}: {err}") from None

    def encode_many(
        self, rows: Sequence[TextRow], tokenizer: PreTrainedTokenizerBase, wheres: Sequence[str]
    ) -> list[tuple[Row | None, int]]:
        """Each row encoded (None when it is left out) with its prompt length; families that can, batch it."""
        out: list[tuple[Row | None, int]] = []
        for row, where in zip(rows, wheres, strict=True):
            encoded = self.encode(row, tokenizer, where)
            out.append((encoded, self.prompt_length(row, tokenizer, where) if encoded is None else 0))
        return out

    def _encode_all(
        self, rows: list[TextRow], tokenizer: PreTrainedTokenizerBase, source: str, scored: bool
    ) -> tuple[list[Row], list[int]]:
        """Encode rows; those that cannot keep a response token are not kept, and the prompt length of each is
        returned. A scored row keeps its full source text and its reference."""
        wheres = [row.where or f"{source}: row {number}" for number, row in enumerate(rows, start=1)]
        out, skipped = [], []
        for row, (encoded, prompt_length) in zip(rows, self.encode_many(rows, tokenizer, wheres), strict=True):
            if encoded is None:
                skipped.append(prompt_length)
                continue
            if scored:
                encoded["source"] = row.prompt if row.messages is None else _conversation(row.messages[:-1])
                encoded["reference"] = row.reference
            out.append(encoded)
        return out, skipped

    def prompt_length(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> int:
        """How many tokens the row's prompt takes in training (for rows `encode` skips)."""
        return len(self.prompt_ids(row, tokenizer))

    def lengths(self, rows: Sequence[Row]) -> list[int]:
        return rows.lengths() if isinstance(rows, EncodedRows) else super().lengths(rows)

    def _why_skipped(self, prompt_lengths: list[int], source: str) -> str:
        """One line with the numbers: how many rows were skipped, their prompt lengths, the limit that keeps them."""
        shortest, longest = min(prompt_lengths), max(prompt_lengths)
        span = f"{shortest} tokens" if shortest == longest else f"{shortest} to {longest} tokens"
        keeps = (
            f"training.max_length {shortest + 1} keeps them"
            if shortest == longest
            else f"training.max_length {shortest + 1} keeps the shortest, {longest + 1} keeps them all"
        )
        return (
            f"{len(prompt_lengths)} rows of {source} have prompts of {span}, which fill training.max_length "
            f"{self.recipe.training.max_length} and leave no room for the response; {keeps}"
        )

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
        pad = tokenizer.pad_token_id
        if pad is None:
            raise AfloraError(f"tokenizer {tokenizer.name_or_path!r} has no padding token, so batches cannot be padded")

        def collate(rows: list[Row]) -> dict[str, torch.Tensor]:
            ids = _pad([row["input_ids"] for row in rows], pad)
            return {
                "input_ids": ids,
                "attention_mask": _pad([np.ones(len(row["input_ids"]), np.int64) for row in rows], 0),
                "labels": _pad([row["labels"] for row in rows], IGNORE),
            }

        return collate

    # ---- scoring ----------------------------------------------------------------------------------
    @abstractmethod
    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """How many label tokens the model's mean loss over `batch` averages."""

    def settings(self, max_new_tokens: int | None = None) -> GenerationSettings:
        cfg = self.recipe.eval
        return GenerationSettings(
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        )

    @torch.no_grad()
    def split_loss(
        self, model: nn.Module, rows: Sequence[Row], tokenizer: PreTrainedTokenizerBase, device: torch.device
    ) -> float:
        """Mean loss per response token over the whole split."""
        was_training = model.training
        model.eval()
        collate = self.collate(tokenizer)
        total, tokens = 0.0, 0
        for indices in self.scoring_batches(rows):
            batch = {key: value.to(device) for key, value in collate([rows[i] for i in indices]).items()}
            count = self.loss_tokens(batch)
            if count:
                total += float(model(**batch).loss) * count
                tokens += count
        model.train(was_training)
        return total / tokens if tokens else math.nan

    def evaluate(
        self,
        model: nn.Module,
        rows: Sequence[Row],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        progress: Progress | None = None,
    ) -> tuple[dict[str, float], list[Prediction]]:
        loss = self.split_loss(model, rows, tokenizer, device)
        report: Callable[[int], None] | None = None
        if progress is not None:
            done = [0]

            def report(rows_in_batch: int) -> None:
                done[0] += rows_in_batch
                progress(done[0], len(rows))

        outputs = generate(
            model,
            tokenizer,
            [list(row["prompt_ids"]) for row in rows],
            self.settings(),
            self.recipe.training.eval_batch_size,
            device,
            report,
        )
        texts = [str(tokenizer.decode(ids, skip_special_tokens=True)).strip() for ids in outputs]
        scored = self.metric.score(texts, [row["reference"] for row in rows])
        metrics = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
        metrics |= self.metric.aggregate(scored)
        predictions = [
            Prediction(
                # what the model saw: the prompt ids decoded (after any truncation); `source` is the full input
                str(tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)),
                text,
                s.extracted,
                self.metric.answer(row["reference"]),
                s.correct,
                s.scores,
                source=row["source"],
            )
            for row, text, s in zip(rows, texts, scored, strict=True)
        ]
        return metrics, predictions

    def complete(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str,
        device: torch.device,
        max_new_tokens: int | None = None,
    ) -> str:
        self.check_tokenizer(tokenizer)
        prompt_ids = self.prompt_ids(user_row(self.spec, prompt), tokenizer)
        output = generate(model, tokenizer, [prompt_ids], self.settings(max_new_tokens), 1, device)[0]
        return str(tokenizer.decode(output, skip_special_tokens=True)).strip()

    @abstractmethod
    def prompt_ids(self, row: TextRow, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """The ids a generation for `row` starts from (nothing of the response)."""


def _pad(sequences: list[Any], value: int) -> torch.Tensor:
    """Right-pad 1-D int sequences to the longest, as one int64 tensor."""
    longest = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return out


def _conversation(messages: list[dict[str, str]]) -> str:
    """A conversation as readable text, for the predictions file."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def ids_array(ids: Sequence[int]) -> np.ndarray:
    """Token ids kept compactly (int32): large text splits hold hundreds of thousands of rows."""
    return np.asarray(ids, dtype=np.int32)
