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

import torch
from transformers import PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError
from aflora_cli.tasks import Row
from aflora_cli.tasks.generative import IGNORE, TextTask, ids_array
from aflora_cli.tasks.text_data import TextRow

Piece = tuple[list[int], bool]  # token ids, and whether the loss is taken on them


class CausalLMTask(TextTask):
    """Prompt -> response with `AutoModelForCausalLM`; no new parameters beside the adapters."""

    family = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"

    def pieces(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> list[Piece]:
        """The row's token pieces in order; the last trainable piece is the response, ending with EOS."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise AfloraError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-sequence token")
        if self.spec.chat_template:
            pieces = [
                (tokenizer.encode(text, add_special_tokens=False), trainable)
                for text, trainable in chat_pieces(_messages(self.spec.format, row), tokenizer, where)
            ]
            last = pieces[-1][0]
            if eos not in last:
                last.append(eos)
            return pieces
        prompt = tokenizer.encode(row.prompt, add_special_tokens=True)
        return [(prompt, False), ([*tokenizer.encode(row.response, add_special_tokens=False), eos], True)]

    def encode(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> Row | None:
        pieces = self.pieces(row, tokenizer, where)
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
            return None
        return {
            "input_ids": ids_array(ids[:limit]),
            "labels": ids_array(labels[:limit]),
            "prompt_ids": ids_array(ids[:prompt_length]),
        }

    def prompt_length(self, row: TextRow, tokenizer: PreTrainedTokenizerBase, where: str) -> int:
        pieces = self.pieces(row, tokenizer, where)
        return sum(len(piece) for piece, _ in pieces) - len(pieces[-1][0])  # as `encode` counts it

    def prompt_ids(self, row: TextRow, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if self.spec.chat_template:
            text = tokenizer.apply_chat_template(
                _messages(self.spec.format, row), tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer.encode(str(text), add_special_tokens=False))
        return list(tokenizer.encode(row.prompt, add_special_tokens=True))

    def loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())  # the model predicts token t+1 from tokens <= t


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
