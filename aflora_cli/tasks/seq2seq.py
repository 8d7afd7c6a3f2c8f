"""Encoder-decoders (BART, mBART, Pegasus, T5, Flan-T5): source -> target, e.g. summarisation.

The prompt (source) is the encoder's input, cut to `training.max_source_length` (default `max_length`); the
response (target) is the labels, cut to `max_target_length`, which the model shifts right into its decoder
inputs itself. The target always ends with EOS, so the decoder learns to stop: T5's and BART's tokenizers
add it, and it is appended for one that does not. With `data.truncation: false`, a source that does not
fit is refused instead of cut.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError
from aflora_cli.tasks import Row
from aflora_cli.tasks.generative import IGNORE, TextTask, ids_array
from aflora_cli.tasks.text_data import TextRow


class Seq2SeqTask(TextTask):
    """Source -> target with `AutoModelForSeq2SeqLM`; no new parameters beside the adapters."""

    family = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.spec.chat_template:
            raise AfloraError(
                f"data.{'format: chat' if self.spec.format == 'chat' else 'chat_template: true'}: chat templates "
                "are for causal language models; this base model is an encoder-decoder"
            )
        super().check_tokenizer(tokenizer)

    def _limits(self) -> tuple[int, int]:
        cfg = self.recipe.training
        return cfg.max_source_length or cfg.max_length, cfg.max_target_length or cfg.max_length

    def encode(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> Row | None:
        source_limit, target_limit = self._limits()
        source = tokenizer(row.prompt, truncation=self.spec.truncation, max_length=source_limit)["input_ids"]
        if len(source) > source_limit:
            raise AfloraError(
                f"{where}: the source has {len(source)} tokens, more than {source_limit} "
                "(training.max_source_length; data.truncation is off)"
            )
        target = list(tokenizer(text_target=row.response, truncation=True, max_length=target_limit)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not target or target[-1] != eos):
            # a tokenizer that does not end targets with EOS (LLaMA-style ones add only BOS): append it,
            # within the limit
            target = [*target[: target_limit - 1], eos]
        return {"input_ids": ids_array(source), "labels": ids_array(target), "prompt_ids": ids_array(source)}

    def prompt_ids(self, row: TextRow, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        source_limit, _ = self._limits()
        return list(tokenizer(row.prompt, truncation=True, max_length=source_limit)["input_ids"])

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())
