"""Freezing scores (Eqs. 2-4), the cubic schedule (Eq. 5) and the freezer that applies them."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from aflora_cli.engine.config import FreezingConfig
from aflora_cli.engine.schedule import frozen_target

Score = Literal["grad", "weight_grad", "grad_over_weight"]


def sensitivity(grad: torch.Tensor, weight: torch.Tensor, score: Score) -> torch.Tensor:
    """The per-element I of Eq. 2 for the chosen score: |∇|, |p·∇| or |∇/p| (0 where p = 0)."""
    if score == "grad":
        return grad.abs()
    if score == "weight_grad":
        return (weight * grad).abs()
    ratio = grad / torch.where(weight == 0, torch.ones_like(weight), weight)
    return torch.where(weight == 0, torch.zeros_like(ratio), ratio).abs()


class Freezer:
    """Scores the adaptive PMs and freezes them, lowest score first, on the schedule of Eq. 5.

    A *unit* is what freezes at once: one PM (`independent`) or the A and B of one module (`together`).
    The EMAs of all still-trainable units live in two flat float32 buffers, so one update is a handful
    of tensor ops however many layers the model has.
    """

    @classmethod
    def from_config(
        cls, matrices: dict[str, nn.Parameter], cfg: FreezingConfig, *, total_steps: int, t_i: int, t_f: int
    ) -> Freezer:
        """A freezer with a recipe's `freezing` settings; t_i and t_f already in steps."""
        return cls(
            matrices,
            total_steps=total_steps,
            t_i=t_i,
            t_f=t_f,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            score=cfg.score,
            interval=cfg.interval,
            together=cfg.granularity == "together",
            power=cfg.power,
        )

    def __init__(
        self,
        matrices: dict[str, nn.Parameter],
        *,
        total_steps: int,
        t_i: int,
        t_f: int,
        beta1: float = 0.85,
        beta2: float = 0.95,
        score: Score = "grad",
        interval: int = 1,
        together: bool = False,
        power: float = 3,
    ) -> None:
        self.matrices = matrices
        self.total_steps, self.t_i, self.t_f, self.power = total_steps, t_i, t_f, power
        self.beta1, self.beta2, self.score, self.interval = beta1, beta2, score, interval
        names = list(matrices)
        if together:
            modules = dict.fromkeys(name.rpartition(".")[0] for name in names)
            self.units = [[n for n in names if n.rpartition(".")[0] == module] for module in modules]
        else:
            self.units = [[name] for name in names]
        self.freeze_log: dict[str, int | None] = {name: None for name in names}
        self.freeze_score: dict[str, float | None] = {name: None for name in names}
        self._active: list[int] = []
        self._ibar = self._ubar = self._segments = self._unit_sizes = torch.empty(0)
        self._set_active([i for i, unit in enumerate(self.units) if matrices[unit[0]].requires_grad])
        self._ibar = torch.zeros(self._segments.numel(), device=self._segments.device)
        self._ubar = torch.zeros_like(self._ibar)

    # ---- bookkeeping of the still-trainable units -------------------------------------------------
    def _active_params(self) -> list[nn.Parameter]:
        return [self.matrices[name] for i in self._active for name in self.units[i]]

    def _set_active(self, active: list[int]) -> None:
        self._active = active
        params = self._active_params()
        device = params[0].device if params else torch.device("cpu")
        sizes = [sum(self.matrices[n].numel() for n in self.units[i]) for i in active]
        self._unit_sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
        self._segments = torch.repeat_interleave(
            torch.arange(len(active), device=device), torch.tensor(sizes, dtype=torch.long, device=device)
        )

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def num_frozen(self) -> int:
        return self.num_units - len(self._active)

    # ---- Eqs. 2-4 ---------------------------------------------------------------------------------
    def gradients_finite(self) -> bool:
        """Whether the still-trainable PMs' gradients are all finite: an inf or NaN must never reach the EMAs,
        which would carry it to the end of the run."""
        grads = [p.grad for p in self._active_params() if p.grad is not None]
        return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def update_scores(self, step: int) -> None:
        """Fold this step's final gradients into the EMAs (every `interval` steps)."""
        if not self._active or step % self.interval:
            return
        params = self._active_params()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        weight = torch.cat([p.detach().reshape(-1) for p in params]) if self.score != "grad" else grad
        current = sensitivity(grad.float(), weight.float(), self.score)
        self._ibar.mul_(self.beta1).add_(current, alpha=1 - self.beta1)
        self._ubar.mul_(self.beta2).add_((current - self._ibar).abs(), alpha=1 - self.beta2)

    def scores(self) -> torch.Tensor:
        """s = mean(Ī ∘ Ū) for each still-trainable unit, in `_active` order."""
        totals = torch.zeros(len(self._active), device=self._ibar.device)
        totals.index_add_(0, self._segments, self._ibar * self._ubar)
        return totals / self._unit_sizes

    def current_scores(self) -> dict[str, float]:
        """Scores of the still-trainable PMs by name (a unit's score is given to each of its PMs)."""
        values = self.scores().tolist()
        return {name: value for i, value in zip(self._active, values) for name in self.units[i]}

    # ---- Eq. 5 ------------------------------------------------------------------------------------
    def apply_schedule(self, step: int) -> list[nn.Parameter]:
        """Freeze the lowest-scoring trainable units until floor(r(t)·N) are frozen; return the new PMs."""
        target = frozen_target(step, self.total_steps, self.t_i, self.t_f, self.num_units, self.power)
        count = target - self.num_frozen
        if count <= 0:
            return []
        scores = self.scores()
        order = torch.argsort(scores, stable=True)[:count].tolist()
        values = scores.tolist()
        chosen = {self._active[pos] for pos in order}
        newly: list[nn.Parameter] = []
        for pos in order:
            for name in self.units[self._active[pos]]:
                param = self.matrices[name]
                param.requires_grad_(False)
                param.grad = None
                self.freeze_log[name] = step
                self.freeze_score[name] = values[pos]
                newly.append(param)
        keep = torch.tensor([i not in chosen for i in self._active], device=self._ibar.device)
        element_keep = keep[self._segments]
        self._ibar, self._ubar = self._ibar[element_keep], self._ubar[element_keep]
        self._set_active([i for i in self._active if i not in chosen])
        return newly

    # ---- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "ibar": self._ibar.cpu(),
            "ubar": self._ubar.cpu(),
            "freeze_log": dict(self.freeze_log),
            "freeze_score": dict(self.freeze_score),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore EMAs and the frozen mask; the PMs frozen in `state` are frozen here too."""
        if set(state["freeze_log"]) != set(self.freeze_log):
            raise ValueError("freezer state names other matrices than this model's")
        self.freeze_log = dict(state["freeze_log"])
        self.freeze_score = dict(state["freeze_score"])
        for name, step in self.freeze_log.items():
            if step is not None:
                self.matrices[name].requires_grad_(False)
        self._set_active([i for i, unit in enumerate(self.units) if self.freeze_log[unit[0]] is None])
        self._ibar = state["ibar"].to(self._segments.device)
        self._ubar = state["ubar"].to(self._segments.device)


def release_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Drop frozen parameters from the optimizer: out of its groups, their state freed."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    release_optimizer_state(optimizer, params)


def release_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Free the optimizer state (AdamW's two moments) of frozen parameters. They stay listed in its groups, where
    a gradient of None keeps them from any update: an optimizer saved by someone else's loop (the Hugging Face
    Trainer) then still loads into a fresh one built over every parameter."""
    for param in params:
        optimizer.state.pop(param, None)
