"""The engine's settings: which layers get adapters and how their projection matrices freeze.

A recipe's `adapter` and `freezing` sections are these classes as they are, and `AfloraConfig` (the Python
API) holds one of each, so the engine depends on nothing above it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aflora_cli.errors import AfloraError

PMPolicy = Literal["trainable", "frozen", "adaptive"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(steps?|epochs?|%)\s*$")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterConfig(_Settings):
    """Which linear layers get an adapter and how their projection matrices (PMs) behave.

    `targets` maps a layer kind (`attention`, `ffn`) to module-name suffixes (`intermediate.dense`) or
    regular expressions (`re:...`, matched against the full module name); None takes the architecture's
    defaults. `policy` maps a kind to `trainable`, `frozen` or `adaptive`; None takes the method's defaults.
    """

    method: Literal["aflora", "lora", "elora"] = "aflora"
    rank: int = Field(default=4, gt=0)
    alpha: float | None = Field(default=None, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    lambda_d_init: float = 0.1
    targets: dict[Literal["attention", "ffn"], list[str]] | None = None
    policy: dict[Literal["attention", "ffn"], PMPolicy] | None = None


AUTO = "auto"
# `auto` takes the paper's t_i and t_f where they leave the ramp room, else the fallback (our quickstarts' values,
# near the authors' GSM8K code): a run bounded by max_steps below an epoch still freezes
PAPER_SCHEDULE = ("1 epoch", "70%")
FALLBACK_SCHEDULE = ("20%", "40%")
MIN_RAMP_SHARE = 0.05  # a ramp over fewer steps than this share of T freezes every PM nearly at once


class FreezingConfig(_Settings):
    """Freezing score (Eqs. 2-4) and schedule (Eq. 5).

    `t_i` and `t_f` are step counts (`500`, `500 steps`), epochs (`1 epoch`), a share of all steps (`70%`) or
    `auto` (the default; see `resolve_schedule`). `power` is the exponent of the ramp: 3 in Eq. 5 of the paper;
    the authors' GSM8K code uses 2.
    """

    t_i: str | int = AUTO
    t_f: str | int = AUTO
    beta1: float = Field(default=0.85, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    score: Literal["grad", "weight_grad", "grad_over_weight"] = "grad"
    interval: int = Field(default=1, gt=0)
    granularity: Literal["independent", "together"] = "independent"
    power: float = Field(default=3, gt=0)

    @field_validator("t_i", "t_f")
    @classmethod
    def _duration(cls, value: str | int) -> str | int:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be >= 0")
            return value
        if value != AUTO and not _DURATION.match(value):
            raise ValueError("expected a step count, 'N epochs', 'N%' or 'auto'")
        return value


def resolve_duration(value: str | int, steps_per_epoch: int, total_steps: int) -> int:
    """Turn a `t_i`/`t_f` setting (not `auto`) into a whole number of optimizer steps."""
    if isinstance(value, int):
        return value
    match = _DURATION.match(value)
    assert match, value  # validated when the recipe was read
    amount, unit = float(match.group(1)), match.group(2)
    if unit.startswith("epoch"):
        return round(amount * steps_per_epoch)
    if unit == "%":
        return round(amount / 100 * total_steps)
    return round(amount)


def min_ramp(total_steps: int) -> int:
    """The fewest steps the ramp of Eq. 5 (from t_i to T - t_f) may span: MIN_RAMP_SHARE of T, at least 1."""
    return max(1, math.ceil(MIN_RAMP_SHARE * total_steps))


def ramp_fits(t_i: int, t_f: int, total_steps: int) -> bool:
    """Whether PMs freeze progressively: t_i before T - t_f, with at least `min_ramp` steps between them."""
    return total_steps - t_f - t_i >= min_ramp(total_steps)


def resolve_schedule(cfg: FreezingConfig, steps_per_epoch: int, total_steps: int) -> tuple[int, int]:
    """t_i and t_f in optimizer steps. Settings left `auto` take the paper's values (t_i one epoch, t_f 70 %)
    where those leave a ramp, else FALLBACK_SCHEDULE (20 %, 40 %); `check_ramp` then judges the result."""

    def in_steps(defaults: tuple[str, str]) -> tuple[int, int]:
        t_i, t_f = (
            resolve_duration(default if value == AUTO else value, steps_per_epoch, total_steps)
            for value, default in zip((cfg.t_i, cfg.t_f), defaults)
        )
        return t_i, t_f

    paper = in_steps(PAPER_SCHEDULE)
    return paper if ramp_fits(*paper, total_steps) else in_steps(FALLBACK_SCHEDULE)


def check_ramp(cfg: FreezingConfig, t_i: int, t_f: int, total_steps: int, *, total_is: str, key: str) -> None:
    """Refuse, in one line with the numbers and the fix, a schedule whose adaptive PMs would never freeze, all
    freeze at once, or freeze over a ramp of a few steps. `total_is` says where T came from (`training.max_steps`);
    `key` is how the caller names the freezing settings (`freezing`)."""
    if ramp_fits(t_i, t_f, total_steps):
        return
    given_i = f" ({cfg.t_i})" if isinstance(cfg.t_i, str) else ""
    given_f = f" ({cfg.t_f})" if isinstance(cfg.t_f, str) else ""
    fix = f"set {key}.t_i: {FALLBACK_SCHEDULE[0]} and {key}.t_f: {FALLBACK_SCHEDULE[1]}, or leave both auto"
    if t_i >= total_steps:
        raise AfloraError(
            f"{key}.t_i = {t_i} steps{given_i} >= T = {total_steps} steps ({total_is}): no PM would ever freeze "
            f"and the run would be LoRA with scaling vectors; {fix}"
        )
    end = total_steps - t_f
    what = (
        f"every adaptive PM would freeze at once at step {t_i}"
        if end <= t_i
        else f"the ramp would span only {end - t_i} steps (at least {min_ramp(total_steps)} needed, "
        f"{MIN_RAMP_SHARE:.0%} of T)"
    )
    raise AfloraError(
        f"{key}.t_i = {t_i} steps{given_i}, T - t_f = {total_steps} - {t_f}{given_f} = {end} steps "
        f"(T from {total_is}): {what}; {fix}"
    )


BaseDtype = Literal["fp32", "bf16", "fp16"]


class QuantizationConfig(_Settings):
    """A base stored in 4 or 8 bits through bitsandbytes (QLoRA-style); the adapters stay fp32 beside it.

    4-bit only: `type` (nf4 or fp4; default nf4), `double_quant` (quantize the quantization constants too;
    default true) and `compute_dtype` (what the 4-bit matmul runs in; default bf16). A 4-bit setting is stored
    with its defaults filled in, so a checkpoint says what was used (and is rebuilt so if a default changes).
    """

    bits: Literal[4, 8]
    type: Literal["nf4", "fp4"] | None = None
    double_quant: bool | None = None
    compute_dtype: BaseDtype | None = None

    @model_validator(mode="before")
    @classmethod
    def _four_bit_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bits") == 4:
            defaults = {"type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
            return {**data, **{key: value for key, value in defaults.items() if data.get(key) is None}}
        return data

    @model_validator(mode="after")
    def _four_bit_keys(self) -> QuantizationConfig:
        if self.bits == 8:
            given = [key for key in ("type", "double_quant", "compute_dtype") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to bits: 4 only")
        return self
