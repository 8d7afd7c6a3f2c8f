"""How the frozen base model is stored: fp32, bf16 or fp16 weights, or 4-/8-bit through bitsandbytes; and which
of its files may be trusted: its own Python code (`trust_remote_code`) and pickled `.bin` weights are refused
unless the recipe allows them.

The adapters, any task head and all optimizer state stay fp32 whatever the base is (as PEFT keeps them);
`engine/layer.py` keeps the adapter path in fp32 beside a half-precision or quantized base layer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aflora_cli.engine.config import BaseDtype, QuantizationConfig
from aflora_cli.errors import AfloraError

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
QUANT_EXTRA = "pip install 'aflora[quant]'"


@dataclass(frozen=True)
class BaseStorage:
    """The dtype the base's weights are stored in, its quantization (None: not quantized), and whether its own
    code may run and its weights may come from pickled `.bin` files."""

    dtype: BaseDtype = "fp32"
    quantization: QuantizationConfig | None = None
    trust_remote_code: bool = False
    allow_bin_weights: bool = False

    def check(self, device: torch.device) -> None:
        """Refuse what cannot run here, before anything is loaded."""
        if self.dtype == "fp16" and device.type != "cuda":
            raise AfloraError("model.dtype: fp16 needs CUDA; use bf16 (or fp32) on the CPU")
        if self.quantization is not None:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise AfloraError(f"model.quantization needs bitsandbytes, which is not installed: {QUANT_EXTRA}")
            compute = self.quantization.compute_dtype
            if compute == "fp16" and device.type != "cuda":
                raise AfloraError("model.quantization.compute_dtype: fp16 needs CUDA; use bf16 or fp32 on the CPU")

    def from_pretrained(self, auto_class: Any, model_dir: Path, device: torch.device | None, **kwargs: Any) -> Any:
        """`auto_class.from_pretrained(model_dir, **kwargs)` with the base stored this way (a quantized base
        placed on `device`, default the CPU), settled for training."""
        stored = self.pretrained_kwargs(device or torch.device("cpu"))
        return _settle(auto_class.from_pretrained(model_dir, **kwargs, **stored))

    def pretrained_kwargs(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained` that load the base this way (a quantized base is placed on
        `device` while it loads: bitsandbytes models cannot be moved afterwards)."""
        kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[self.dtype], "trust_remote_code": self.trust_remote_code}
        if not self.allow_bin_weights:
            kwargs["use_safetensors"] = True
        quant = self.quantization
        if quant is not None:
            from transformers import BitsAndBytesConfig

            with quiet_loggers("bitsandbytes", "kernels"):
                import bitsandbytes  # noqa: F401 (imported here, so that its import-time warnings stay quiet)

            if quant.bits == 8:
                config = BitsAndBytesConfig(load_in_8bit=True)
            else:
                assert quant.compute_dtype is not None  # QuantizationConfig fills in every 4-bit default
                config = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=quant.type,
                    bnb_4bit_use_double_quant=quant.double_quant,
                    bnb_4bit_compute_dtype=TORCH_DTYPES[quant.compute_dtype],
                )
            kwargs |= {"quantization_config": config, "device_map": {"": device}}
        return kwargs

    def describe(self) -> dict[str, Any]:
        """As the manifest records it."""
        return {
            "dtype": self.dtype,
            "quantization": None if self.quantization is None else self.quantization.model_dump(mode="json"),
        }


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers while the block runs. Importing bitsandbytes on a CPU with AVX512-BF16
    looks for an optional kernel on the hub and logs two warnings when offline or without it (through the
    `kernels` package); the slow path it falls back to is the one we use, and a one-line refusal must stay one
    line: our output stays ours."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` through a quantizer (its layers cannot be moved or cast)."""
    return bool(getattr(model, "is_quantized", False))


def _settle(model: nn.Module) -> nn.Module:
    """Settle a freshly loaded base: bitsandbytes' CPU inference fast path repacks a 4-bit weight in place the
    first time the layer runs in eval mode without gradients; the repacked weight no longer trains (zero
    gradients) nor dequantizes, so that path is turned off (CPU only; no effect on CUDA)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a plain attribute of bnb's layer)
    return model


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)`, except for a quantized model, which was loaded onto its device already."""
    return model if is_quantized(model) else model.to(device)


def storage_of(model: nn.Module) -> BaseStorage:
    """How a model the user loaded is stored: its bitsandbytes config, or the dtype of its first linear weight."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    quant: QuantizationConfig | None = None
    if config is not None:
        settings = config if isinstance(config, dict) else config.to_dict()
        if settings.get("load_in_4bit"):
            compute = DTYPE_NAMES.get(_as_dtype(settings.get("bnb_4bit_compute_dtype")) or torch.float32)
            quant = QuantizationConfig(
                bits=4,
                type=settings.get("bnb_4bit_quant_type", "nf4"),
                double_quant=bool(settings.get("bnb_4bit_use_double_quant", False)),
                compute_dtype=compute or "fp32",  # type: ignore[arg-type]
            )
        elif settings.get("load_in_8bit"):
            quant = QuantizationConfig(bits=8)
    linear = next((m for m in model.modules() if type(m) is nn.Linear), None)
    dtype = DTYPE_NAMES.get(linear.weight.dtype, "fp32") if linear is not None else "fp32"
    return BaseStorage(dtype, quant)  # type: ignore[arg-type]


def _as_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype) or value is None:
        return value
    return getattr(torch, str(value).replace("torch.", ""), None)
