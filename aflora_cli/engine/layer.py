"""The adapter layer of Eq. 1: Y = W0·X + Λb·B·Λd·A·X, beside a frozen linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` W0 with a parallel low-rank path.

    With vectors (methods `aflora`, `elora`): Y = W0·X + s·Λb ⊙ B(Λd ⊙ A·X).
    Without vectors (method `lora`): Y = W0·X + s·B·A·X, with s = alpha / r.
    The three small factors are folded into one r-column matrix before touching activations, so the
    path costs two thin matmuls, like LoRA, whatever trains.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        vectors: bool = True,
        lambda_d_init: float = 0.1,
        scaling: float = 1.0,
        dropout: float = 0.0,
        zero_b: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.rank = rank
        self.scaling = scaling
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, dtype=weight.dtype, device=weight.device))
        if vectors:
            self.lambda_d = nn.Parameter(torch.full((rank,), lambda_d_init, dtype=weight.dtype, device=weight.device))
            self.lambda_b = nn.Parameter(torch.zeros(base.out_features, dtype=weight.dtype, device=weight.device))
        else:
            self.register_parameter("lambda_d", None)
            self.register_parameter("lambda_b", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_projections(zero_b)

    def reset_projections(self, zero_b: bool) -> None:
        """Kaiming-uniform A and B (a = 0, as the authors' code), or LoRA's init: A as nn.Linear, B zeros."""
        if zero_b:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A)
            nn.init.kaiming_uniform_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def up_projection(self) -> torch.Tensor:
        """s·diag(Λb)·B·diag(Λd) (out × r): everything right of A, as one small matrix."""
        up = self.lora_B
        if self.lambda_b is not None:
            up = self.lambda_b.unsqueeze(1) * up * self.lambda_d.unsqueeze(0)
        return up * self.scaling if self.scaling != 1.0 else up

    def delta_weight(self) -> torch.Tensor:
        """The update the path adds to W0: s·diag(Λb)·B·diag(Λd)·A (out × in)."""
        return self.up_projection() @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        down = F.linear(self.dropout(x), self.lora_A)
        return result + F.linear(down, self.up_projection())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank path into W0; forward then runs the base layer alone."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the low-rank path back out of W0."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        vectors = self.lambda_b is not None
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, vectors={vectors}, scaling={self.scaling}"
