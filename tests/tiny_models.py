"""Tiny randomly initialised transformers classifiers (hidden 32, 2 layers) for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

HIDDEN = 32
LAYERS = 2
INTERMEDIATE = 48  # deliberately not a multiple of HIDDEN, so in/out mix-ups change the counts
NUM_LABELS = 3
VOCAB = 100
LLAMA_HEADS = 4
LLAMA_KV_HEADS = 2  # grouped-query attention: k/v project to KV_HEADS * head_dim = 16, not 32


def _encoder_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**_encoder_kwargs())).eval()


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(**_encoder_kwargs(), pad_token_id=1)
    return RobertaForSequenceClassification(config).eval()


def tiny_deberta(seed: int = 0) -> DebertaV2ForSequenceClassification:
    torch.manual_seed(seed)
    config = DebertaV2Config(**_encoder_kwargs(), pooler_hidden_size=HIDDEN, pooler_dropout=0.0)
    return DebertaV2ForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


BUILDERS = {"bert": tiny_bert, "roberta": tiny_roberta, "deberta-v2": tiny_deberta, "llama": tiny_llama}


def sample_batch(seed: int = 1, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Token ids in 3..VOCAB-1 (no pad ids), full attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
