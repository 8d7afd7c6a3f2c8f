"""The sweep spec: a base recipe, named settings (any recipe keys), a learning-rate ladder, seeds, how to choose
and what to report. Validated in one place, every grid point through the recipe parser, before anything trains."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import parse_recipe, set_dotted

OWNED_KEYS = ("output_dir", "seed")  # every run's own: set by the sweep, never by a setting


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LrLadder(_Section):
    """Learning rates a setting may take, ascending. The grid starts at `start` (default: the whole ladder) and,
    while the best value sits at an edge of what has run, grows one ladder step past that edge. `head_lr: same`
    sets the head's rate to the adapter's; `recipe` leaves the recipe's head rate alone."""

    ladder: list[float] = Field(min_length=1)
    start: list[float] | None = None
    head_lr: Literal["same", "recipe"] = "same"

    @field_validator("ladder")
    @classmethod
    def _ascending(cls, ladder: list[float]) -> list[float]:
        if any(lr <= 0 for lr in ladder) or ladder != sorted(set(ladder)):
            raise ValueError("expected positive rates in ascending order, each once")
        return ladder

    @model_validator(mode="after")
    def _start_on_ladder(self) -> LrLadder:
        outside = [lr for lr in self.start or [] if lr not in self.ladder]
        if outside:
            raise ValueError(f"start {outside[0]:g} is not on the ladder")
        if self.start is not None and not self.start:
            raise ValueError("start: expected at least one rate")
        return self

    @property
    def first(self) -> list[float]:
        return sorted(set(self.start)) if self.start else list(self.ladder)

    @property
    def keys(self) -> tuple[str, ...]:
        return ("training.lr", "training.head_lr") if self.head_lr == "same" else ("training.lr",)


class Selection(_Section):
    """The split and metric each setting's learning rate is chosen on (with the first seed), and which way is
    better."""

    split: str = "validation"
    metric: str
    goal: Literal["max", "min"] = "max"


class SweepSpec(_Section):
    recipe: str
    output_dir: str
    set: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = Field(min_length=1)
    lr: LrLadder | None = None
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    selection: Selection
    reported_split: str = "test"
    baseline: str | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("expected each seed once")
        return seeds

    @model_validator(mode="after")
    def _baseline_in_grid(self) -> SweepSpec:
        if self.baseline is not None and self.baseline not in self.settings:
            raise ValueError(f"baseline: {self.baseline!r} is not a setting; one of {', '.join(self.settings)}")
        return self


class Sweep:
    """A validated spec with its base recipe read: what every run is, and the hash its results carry."""

    def __init__(self, spec: SweepSpec, path: Path, base: dict[str, Any]) -> None:
        self.spec = spec
        self.path = path
        self.base = base
        self.recipe_path = path.parent / spec.recipe  # as given: relative to where the sweep runs, like output_dir
        self.output_dir = Path(spec.output_dir)
        self.results_file = self.output_dir / "results.jsonl"

    @property
    def names(self) -> list[str]:
        return list(self.spec.settings)

    @property
    def hash(self) -> str:
        """What makes two runs of a setting comparable: the base recipe, the keys every run sets, how the head
        rate follows and what is chosen on. Seeds, the ladder and the baseline may change; the results stay."""
        base = {k: v for k, v in self.base.items() if k not in OWNED_KEYS}
        spec = self.spec
        what = {
            "recipe": base,
            "set": spec.set,
            "head_lr": spec.lr.head_lr if spec.lr else None,
            "selection": spec.selection.model_dump(),
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def overrides(self, name: str, lr: float | None, seed: int, run_dir: Path) -> dict[str, Any]:
        """The dotted keys one run sets on the base recipe, in the order `--set` applies them."""
        keys: dict[str, Any] = {"output_dir": str(run_dir), "seed": seed, **self.spec.set, **self.spec.settings[name]}
        if lr is not None and self.spec.lr is not None:
            keys.update(dict.fromkeys(self.spec.lr.keys, lr))
        return keys

    def raw_recipe(self, overrides: dict[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(self.base)
        for key, value in overrides.items():
            set_dotted(raw, key, copy.deepcopy(value), key)
        return raw


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise AfloraError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise AfloraError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', None) or 'not valid YAML'}") from None
    except UnicodeDecodeError:
        raise AfloraError(f"{path}: not a UTF-8 text file") from None


def _spec_error(path: Path, err: ValidationError) -> AfloraError:
    first = err.errors()[0]
    key = "".join(f"{part}: " for part in (".".join(str(part) for part in first["loc"]),) if part)
    problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return AfloraError(f"{path}: {key}{problem}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a spec: its own keys, then every setting at every rate of the ladder through the recipe
    parser. Any problem is one line naming the spec and the key."""
    path = Path(path)
    raw = _read_yaml(path, "sweep spec")
    if not isinstance(raw, dict):
        raise AfloraError(f"{path}: expected a mapping (recipe, output_dir, settings, selection, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise _spec_error(path, err) from None
    base = _read_yaml((path.parent / spec.recipe), "base recipe (recipe:)")
    if not isinstance(base, dict):
        raise AfloraError(f"{path.parent / spec.recipe}: expected a mapping of recipe sections at the top level")
    sweep = Sweep(spec, path, base)
    owned = OWNED_KEYS + (spec.lr.keys if spec.lr else ())
    for where, keys in [("set", spec.set), *((f"settings.{n}", keys) for n, keys in spec.settings.items())]:
        taken = next((key for key in keys if key in owned), None)
        if taken is not None:
            hint = "the lr ladder sets it" if taken.startswith("training.") else "the sweep sets it for every run"
            raise AfloraError(f"{path}: {where}.{taken}: not settable here: {hint}")
    rates = spec.lr.ladder if spec.lr else [None]
    for name in spec.settings:
        for lr in rates:
            overrides = sweep.overrides(name, lr, spec.seeds[0], sweep.output_dir / "check")
            try:
                raw_recipe = sweep.raw_recipe(overrides)
            except AfloraError as err:
                raise AfloraError(f"{path}: settings.{name}: {err}") from None
            parse_recipe(raw_recipe, f"{path}: settings.{name}" + ("" if lr is None else f" at lr {lr:g}"))
    return sweep
