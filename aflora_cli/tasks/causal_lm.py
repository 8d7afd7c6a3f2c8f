"""Causal language models (LLaMA, Gemma, Phi-3, GPT-2, ...): instruction and chat fine-tuning.

A row becomes one sequence: the prompt's tokens, then the response's, then EOS. The loss is taken on the
response (and EOS) only — prompt labels are -100 — unless `data.train_on_prompt`. Prompt and response are
tokenized separately, exactly as a generation later sees them: the prompt's ids, then whatever the model
adds. With a chat template, every assistant turn of the conversation is learned and everything else
(system, user, the template's own markup) is not.

A row longer than `training.max_length` is cut at the end; a row whose prompt alone fills `max_length` has
no response token left, so it is skipped and counted (`data.truncation: false` refuses such rows instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError
from aflora_cli.tasks import Row
from aflora_cli.tasks.generative import IGNORE, TextTask, ids_array
from aflora_cli.tasks.packing import pack_rows
from aflora_cli.tasks.text_data import TextRow

Piece = tuple[list[int], bool]  # token ids, and whether the loss is taken on them


class CausalLMTask(TextTask):
    """Prompt -> response with `AutoModelForCausalLM`; no new parameters beside the adapters."""

    family = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"

    def piece_texts(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> list[tuple[str, bool]]:
        """The row's text pieces in order and whether the loss is taken on each; the last learned piece is the
        response. A plain row's first piece (the prompt) is tokenized with the tokenizer's special tokens."""
        if self.spec.chat_template:
            return chat_pieces(_messages(self.spec.format, row), tokenizer, where)
        return [(row.prompt, False), (row.response, True)]

    def encode_many(
        self, rows: Sequence[TextRow], tokenizer: PreTrainedTokenizerBase, wheres: Sequence[str]
    ) -> list[tuple[Row | None, int]]:
        """Encode rows with one batched call of the (fast) tokenizer per kind of piece: the same ids as one call
        per piece, at a fraction of the cost."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise AfloraError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-sequence token")
        texts = [self.piece_texts(row, tokenizer, where) for row, where in zip(rows, wheres, strict=True)]
        chat = self.spec.chat_template
        with_special = [] if chat else [pieces[0][0] for pieces in texts]
        without = [text for pieces in texts for text, _ in (pieces if chat else pieces[1:])]
        ids_with = iter(_token_ids(tokenizer, with_special, True))
        ids_without = iter(_token_ids(tokenizer, without, False))
        out = []
        for pieces_text, where in zip(texts, wheres, strict=True):
            pieces: list[Piece] = [
                (list(next(ids_with if k == 0 and not chat else ids_without)), learned)
                for k, (_, learned) in enumerate(pieces_text)
            ]
            last = pieces[-1][0]
            if not chat or eos not in last:
                last.append(eos)
            out.append(self._assemble(pieces, where))
        return out

    def _assemble(self, pieces: list[Piece], where: str) -> tuple[Row | None, int]:
        """One row's ids, labels and prompt ids from its pieces (None when no response token fits), and the
        length of its prompt."""
        ids: list[int] = []
        labels: list[int] = []
        for piece, trainable in pieces:
            ids += piece
            labels += piece if trainable or self.spec.train_on_prompt else [IGNORE] * len(piece)
        prompt_length = len(ids) - len(pieces[-1][0])
        limit = self.recipe.training.max_length
        if len(ids) > limit and not self.spec.truncation:
            raise AfloraError(
                f"{where}: {len(ids)} tokens, more than training.max_length {limit} (data.truncation is off)"
            )
        if prompt_length >= limit:
            return None, prompt_length
        encoded = {
            "input_ids": ids_array(ids[:limit]),
            "labels": ids_array(labels[:limit]),
            "prompt_ids": ids_array(ids[:prompt_length]),
        }
        return encoded, prompt_length

    def encode(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> Row | None:
        return self.encode_many([row], tokenizer, [where])[0][0]

    def prompt_length(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> int:
        return self.encode_many([row], tokenizer, [where])[0][1]

    def prompt_ids(self, row: TextRow, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if self.spec.chat_template:
            text = tokenizer.apply_chat_template(
                _messages(self.spec.format, row), tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer.encode(str(text), add_special_tokens=False))
        return list(tokenizer.encode(row.prompt, add_special_tokens=True))

    def packed_collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise AfloraError(f"tokenizer {tokenizer.name_or_path!r} has no padding or end-of-sequence token")
        limit = self.recipe.training.max_length
        return lambda rows: pack_rows(rows, limit, pad)

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # the model predicts token t+1 from tokens <= t


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    """Each text's token ids, in one batched call."""
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=special)["input_ids"])


def _messages(data_format: str, row: TextRow) -> list[dict[str, str]]:
    """The conversation to render: the row's own, or its prompt as the user's turn and response as the answer."""
    if data_format == "chat":
        assert row.messages is not None
        return row.messages
    conversation = [{"role": "user", "content": row.prompt}]
    return conversation + ([{"role": "assistant", "content": row.response}] if row.response else [])


def chat_pieces(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str
) -> list[tuple[str, bool]]:
    """The conversation rendered with the chat template, cut into (text, learned?) pieces: each assistant
    turn is learned, the text before it (up to and including the generation prompt) is not.

    Rendering conversation prefixes one turn at a time finds where each answer starts and ends; a template
    that rewrites earlier turns when later ones are added cannot be cut this way and is refused.
    """

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], tokenizer, True, where)
        through = render_chat(messages[: i + 1], tokenizer, False, where)
        if not (before.startswith(done) and through.startswith(before)):
            raise AfloraError(
                f"{where}: the tokenizer's chat template renders this conversation differently as it grows, "
                "so its answers cannot be told apart from the prompt"
            )
        pieces += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    return [(text, learned) for text, learned in pieces if text]


def render_chat(
    turns: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, generation_prompt: bool, where: str
) -> str:
    """The conversation as the chat template writes it (text with the template's special tokens)."""
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template raises what its authors chose (jinja errors, ValueError, ...)
        raise AfloraError(f"{where}: the tokenizer's chat template failed on this conversation ({err})") from None
    return str(text)
