"""The adapter layer of Eq. 1: Y = W0·X + Λb·B·Λd·A·X, beside a frozen linear layer.

The adapter's own tensors are always fp32, whatever the base is stored in (fp32, bf16, fp16, 4- or 8-bit).
The fused node below runs only where everything is fp32: in half precision, forming W0 + ΔW would round
away every part of a small ΔW below W0's last bit, so there the low-rank path is computed apart, in fp32,
and added to the base layer's output, as PEFT does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """W0 + up·A (out × in)."""
    return torch.addmm(weight, up.to(weight.dtype), lora_a.to(weight.dtype))


def merging_is_cheaper(
    rows: int, in_features: int, out_features: int, need_x: bool, need_a: bool, need_up: bool
) -> bool:
    """Whether forming W0 + up·A (in the forward, and again for the input gradient) costs no more
    multiply-adds than the thin products it replaces; both sides in units of the rank r."""
    thin = rows * (in_features + out_features)  # A·x and its accumulation into the output
    if need_x:  # the bottleneck gradient (shared with A's when A trains) and its accumulation into x's
        thin += rows * in_features + (0 if need_a else rows * out_features)
    merged = in_features * out_features * (2 if need_x else 1) + (rows * in_features if need_up else 0)
    return merged <= thin


HALF = (torch.bfloat16, torch.float16)


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer: nn.Linear and its subclasses (bitsandbytes' quantized layers, whose
    packed weight has another shape) say so themselves; GPT-2's Conv1D stores its weight in × out."""
    if isinstance(layer, Conv1D):
        return layer.nf, int(cast(torch.Tensor, layer.weight).shape[0])
    return int(layer.out_features), int(layer.in_features)  # type: ignore[arg-type]


class _AdaptedLinear(torch.autograd.Function):
    """W0·x + b + up·(A·x_a) in one node, with the fewest passes over the activations.

    Same values (up to rounding) and gradients as the plain autograd expression, but much cheaper on CPU
    (measured on all-MiniLM-L6-v2): products with r = 4 columns are memory-bound, each one reads a whole
    activation or gradient tensor. Two strategies, whichever costs fewer multiply-adds for this call:
    - merged (the adapter sees x itself, enough rows): W0 + up·A is formed and used for the forward and
      the input gradient, so the low-rank path adds no pass over the output or its gradient; the only thin
      products left are the ones trainable factors need (`A·x` for `up`'s gradient, `upᵀ·gᵀ` for A's);
    - thin (few rows, or dropout on the adapter's input `x_a`): the rank-r product is accumulated into
      the base output (`addmm_`), and its input gradient into the base's, with r-row products
      (`downᵀ·g`, `upᵀ·gᵀ`), which run several times faster than autograd's `gᵀ·down` and `g·up`.
    """

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, lora_a, up, grad_enabled):
        out_features, in_features = weight.shape
        need_x, _, _, _, need_a, need_up, _ = (n and grad_enabled for n in ctx.needs_input_grad)
        ctx.same_input = x_a is x
        ctx.merged = ctx.same_input and merging_is_cheaper(
            x.numel() // in_features, in_features, out_features, need_x, need_a, need_up
        )
        ctx.x_dtype, ctx.xa_dtype = x.dtype, x_a.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if ctx.merged:
            out = F.linear(x, _merged_weight(weight, lora_a, up), bias)
            down = F.linear(x, lora_a) if need_up else None
        else:
            out = F.linear(x, weight, bias)
            down = F.linear(x_a, lora_a).to(out.dtype)
            out.view(-1, out_features).addmm_(down.reshape(-1, down.shape[-1]), up.to(out.dtype).t())
        ctx.save_for_backward(
            x if weight.requires_grad else None,
            x_a if lora_a.requires_grad else None,
            weight,
            lora_a,
            up,
            down if up.requires_grad else None,
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        x, x_a, weight, lora_a, up, down = ctx.saved_tensors
        need_x, need_xa, need_w, need_b, need_a, need_up, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        dtype, lead = g.dtype, grad.shape[:-1]
        grad_x = grad_xa = grad_w = grad_b = grad_a = grad_up = None
        grad_down_t = grad_down = None  # the gradient at the rank-r bottleneck: (r × N), and laid out (N × r)
        if need_a or (not ctx.merged and (need_x or need_xa)):
            grad_down_t = up.to(dtype).t().mm(g.t())
            grad_down = grad_down_t.t().contiguous() if not ctx.merged else None
        if need_x:
            if ctx.merged:
                grad_x = g.mm(_merged_weight(weight, lora_a, up).to(dtype))
            else:
                grad_x = g.mm(weight.to(dtype))
                if ctx.same_input:
                    assert grad_down is not None  # computed above for the thin path
                    grad_x.addmm_(grad_down, lora_a.to(dtype))
            grad_x = grad_x.view(*lead, weight.shape[1]).to(ctx.x_dtype)
        if need_xa and not ctx.same_input:
            assert grad_down is not None
            grad_xa = grad_down.mm(lora_a.to(dtype)).view(*lead, lora_a.shape[1]).to(ctx.xa_dtype)
        if need_w:
            grad_w = x.reshape(-1, x.shape[-1]).to(dtype).t().mm(g).t().to(weight.dtype)
        if need_b:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        if need_a:
            assert grad_down_t is not None
            grad_a = grad_down_t.mm(x_a.reshape(-1, x_a.shape[-1]).to(dtype)).to(lora_a.dtype)
        if need_up:
            grad_up = down.reshape(-1, down.shape[-1]).to(dtype).t().mm(g).t().to(up.dtype)
        return grad_x, grad_xa, grad_w, grad_b, grad_a, grad_up, None


class AdapterLinear(nn.Module):
    """A frozen `nn.Linear` (or GPT-2's transposed `Conv1D`) W0 with a parallel low-rank path.

    With vectors (methods `aflora`, `elora`): Y = W0·X + s·Λb ⊙ B(Λd ⊙ A·X).
    Without vectors (method `lora`): Y = W0·X + s·B·A·X, with s = alpha / r.
    The three small factors are folded into one r-column matrix before touching activations, so the
    path costs two thin matmuls, like LoRA, whatever trains.
    """

    def __init__(
        self,
        base: nn.Module,
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
        # GPT-2's Conv1D keeps its weight as in × out: the layer works on the out × in view of it
        self.transposed = isinstance(base, Conv1D)
        out_features, in_features = linear_features(base)
        weight = self.base_weight()
        # fp32 over a half-precision or quantized base; an fp64 base (gradient checks) keeps fp64
        dtype = weight.dtype if weight.dtype.is_floating_point and weight.dtype not in HALF else torch.float32
        device = weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        if vectors:
            self.lambda_d = nn.Parameter(torch.full((rank,), lambda_d_init, dtype=dtype, device=device))
            self.lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("lambda_d", None)
            self.register_parameter("lambda_b", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.fixed_weight: torch.Tensor | None = None  # W0 + up·A, formed once by `fixed_adapters`
        self.reset_projections(zero_b)

    def reset_projections(self, zero_b: bool) -> None:
        """Kaiming-uniform A and B (a = 0, as the authors' code), or LoRA's init: A as nn.Linear, B zeros."""
        if zero_b:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_A)
            nn.init.kaiming_uniform_(self.lora_B)

    def base_weight(self) -> torch.Tensor:
        """W0 as out × in (a view of Conv1D's transposed weight)."""
        weight = self.base.weight
        assert isinstance(weight, torch.Tensor)
        return weight.t() if self.transposed else weight

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as it stores it: models read `<layer>.weight` of a linear they own (T5's
        feed-forward casts its input to `wo.weight.dtype`), and still find it with an adapter in place."""
        weight = self.base.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    def up_projection(self) -> torch.Tensor:
        """s·diag(Λb)·B·diag(Λd) (out × r): everything right of A, as one small matrix."""
        up: torch.Tensor = self.lora_B
        if self.lambda_b is not None:
            up = self.lambda_b.unsqueeze(1) * up * self.lambda_d.unsqueeze(0)
        return up * self.scaling if self.scaling != 1.0 else up

    def delta_weight(self) -> torch.Tensor:
        """The update the path adds to W0: s·diag(Λb)·B·diag(Λd)·A (out × in)."""
        return self.up_projection() @ self.lora_A

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused node may run: a plain fp32 (or fp64) layer (not a subclass such as a quantized
        layer, not hooked) outside half-precision autocast. Otherwise the low-rank path runs apart (`separate`)."""
        base = self.base
        if type(base) not in (nn.Linear, Conv1D) or base._forward_hooks or base._forward_pre_hooks:
            return False
        weight = self.base_weight()
        if weight.dtype in HALF or x.dtype != weight.dtype:
            return False
        device = x.device.type
        return not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF)

    def separate(self, x: torch.Tensor) -> torch.Tensor:
        """W0·X by the base layer as it is (any dtype, quantized, hooked), plus the low-rank path beside it.

        Under bf16 autocast the path's matmuls run in bf16, as PEFT runs LoRA's: bf16 keeps fp32's range, and
        ΔW is never added to W0, so only the path's own rounding (~0.4 %) is lost. Otherwise the path runs in
        fp32 outside autocast (fp16's range would flush the small early ΔW) and the sum is taken in fp32."""
        out = self.base(x)
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
            return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.up_projection())
        with torch.autocast(device, enabled=False):
            x_a = self.dropout(x).to(self.lora_A.dtype)
            delta = F.linear(F.linear(x_a, self.lora_A), self.up_projection())
            return (out.to(delta.dtype) + delta).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.merged:
            return base(x)
        if not self.fusable(x):
            return self.separate(x)
        x_a = self.dropout(x)
        if self.fixed_weight is not None and not torch.is_grad_enabled() and x_a is x:
            rows = x.numel() // self.in_features
            if merging_is_cheaper(rows, self.in_features, self.out_features, False, False, False):
                bias = cast(torch.Tensor | None, base.bias)
                return F.linear(x, self.fixed_weight, bias)  # what the merged path would form, formed once
        up, weight = self.up_projection(), self.base_weight()
        return _AdaptedLinear.apply(x, x_a, weight, base.bias, self.lora_A, up, torch.is_grad_enabled())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the low-rank path into W0 (the sum taken in fp32, rounded once to W0's dtype); forward then
        runs the base layer alone."""
        if not self.merged:
            weight = self.base_weight()
            weight.copy_(weight + self.delta_weight())  # type promotion: a bf16 W0 + the fp32 ΔW sums in fp32
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the low-rank path back out of W0."""
        if self.merged:
            weight = self.base_weight()
            weight.sub_(self.delta_weight().to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        vectors = self.lambda_b is not None
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, vectors={vectors}, "
            f"scaling={self.scaling}"
        )


@contextmanager
def fixed_adapters(model: nn.Module) -> Iterator[None]:
    """While no weight changes (scoring a split), form each adapter's W0 + up·A once instead of for every batch.

    The same tensor from the same inputs as the per-batch merged path, so outputs are bit for bit the same;
    it costs one extra copy of every adapted weight while it lasts (use it for encoders, not for LLMs).
    """
    modules = [
        m
        for m in model.modules()
        if isinstance(m, AdapterLinear) and not m.merged and m.base_weight().dtype not in HALF
    ]
    with torch.no_grad():
        for module in modules:
            module.fixed_weight = _merged_weight(module.base_weight(), module.lora_A, module.up_projection())
    try:
        yield
    finally:
        for module in modules:
            module.fixed_weight = None
