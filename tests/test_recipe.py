"""Recipes: every shipped one parses, the GLUE ones carry Table 5, overrides and validation work."""

from __future__ import annotations

from pathlib import Path

import pytest

from aflora_cli.engine.config import resolve_duration
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import apply_override, load_recipe, set_dotted

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SWEEPS = sorted(RECIPES.glob("sweep-*.yaml"))  # sweep specs (`aflora sweep`), not recipes
SHIPPED = sorted(set(RECIPES.glob("*.yaml")) - set(SWEEPS))

# Table 5 of the paper: epochs, head lr, lr, t_f (epochs)
TABLE_5 = {
    "cola": (20, 4e-2, 1e-2, 14),
    "sst2": (10, 4e-3, 4e-3, 7),
    "mrpc": (20, 8e-2, 1e-2, 14),
    "qnli": (10, 4e-3, 1e-3, 7),
    "stsb": (20, 2e-2, 2e-3, 14),
    "rte": (20, 4e-2, 1e-3, 14),
    "mnli": (10, 4e-3, 1e-3, 7),
    "qqp": (10, 4e-3, 4e-3, 7),
}


def test_all_glue_recipes_and_the_quickstart_ship() -> None:
    assert {p.stem for p in SHIPPED} >= {f"glue-{task}" for task in TABLE_5} | {"quickstart"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_starts_with_its_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert path.read_text().splitlines()[0] == f"# aflora train recipes/{path.name}"
    assert recipe.output_dir


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_spec_validates_and_starts_with_its_command(path: Path) -> None:
    from aflora_cli.commands.sweep.spec import load_sweep

    load_sweep(path)  # every grid point through the recipe parser, as `aflora sweep` does before training
    assert path.read_text().splitlines()[0].startswith(f"# aflora sweep recipes/{path.name}")


@pytest.mark.parametrize("task", sorted(TABLE_5))
def test_glue_recipes_carry_table_5(task: str) -> None:
    epochs, head_lr, lr, t_f = TABLE_5[task]
    recipe = load_recipe(RECIPES / f"glue-{task}.yaml")
    assert recipe.model.name_or_path == "microsoft/deberta-v3-base"
    assert recipe.data.task == task
    assert (recipe.adapter.method, recipe.adapter.rank) == ("aflora", 4)
    assert recipe.adapter.policy == {"ffn": "adaptive", "attention": "frozen"}
    assert (recipe.training.batch_size, recipe.training.max_length) == (64, 256)
    assert (recipe.training.epochs, recipe.training.lr, recipe.training.head_lr) == (epochs, lr, head_lr)
    assert (recipe.freezing.beta1, recipe.freezing.beta2) == (0.85, 0.95)
    steps_per_epoch = 100
    total = epochs * steps_per_epoch
    assert resolve_duration(recipe.freezing.t_i, steps_per_epoch, total) == steps_per_epoch
    assert resolve_duration(recipe.freezing.t_f, steps_per_epoch, total) == t_f * steps_per_epoch


def test_overrides_reach_any_key(tmp_path: Path) -> None:
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [
            "training.max_steps=40",
            "output_dir=runs/x",
            "seed=3",
            "data.max_train_samples=100",
            "adapter.policy.attention=adaptive",
        ],
    )
    assert (recipe.training.max_steps, recipe.seed, recipe.data.max_train_samples) == (40, 3, 100)
    assert recipe.output_dir == "runs/x"
    assert recipe.adapter.policy == {"attention": "adaptive"}


def test_durations() -> None:
    assert resolve_duration(30, 10, 100) == 30
    assert resolve_duration("2 epochs", 10, 100) == 20
    assert resolve_duration("70%", 10, 100) == 70
    assert resolve_duration("15 steps", 10, 100) == 15


def test_relative_data_files_are_taken_from_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "output_dir: out\nmodel: {name_or_path: m}\n"
        "data: {task: custom, train_file: data/train.csv, text_columns: [text]}\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.train_file == str(tmp_path / "data" / "train.csv")


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\nbogus: 1\n", [], r"r\.yaml: bogus: unknown key"),
        (
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\ntraining: {lr: fast}\n",
            [],
            r"training\.lr: .*number",
        ),
        (
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\n",
            ["training.batch_size=0"],
            r"training\.batch_size: .*greater than 0",
        ),
        (
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\n",
            ["adapter.method=dora"],
            r"adapter\.method: .*'aflora'",
        ),
        (
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\n",
            ["freezing.t_f=soon"],
            r"freezing\.t_f: .*epochs",
        ),
        ("output_dir: o\ndata: {task: sst2}\n", [], r"r\.yaml: model: Field required"),
        (
            "output_dir: o\nmodel: {name_or_path: m}\ndata: {task: sst2}\n",
            ["training.max_steps"],
            r"expected KEY=VALUE",
        ),
        ("- a list\n", [], r"r\.yaml: expected a mapping"),
        ("output_dir: [unclosed\n", [], r"r\.yaml: invalid YAML at line 2"),
    ],
)
def test_bad_recipes_name_the_file_and_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(AfloraError, match=message) as err:
        load_recipe(path, overrides)
    assert "\n" not in str(err.value)


def test_missing_recipe(tmp_path: Path) -> None:
    with pytest.raises(AfloraError, match=r"nope\.yaml: recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_dotted_override_through_a_value_is_refused_in_one_line() -> None:
    """`--set` (and a sweep's settings, through the same `set_dotted`) makes missing sections on the way, but a key
    that holds a value is not a section: one line naming the setting."""
    raw: dict = {"training": {"max_steps": 40}}
    apply_override(raw, "eval.max_new_tokens=8")
    assert raw == {"training": {"max_steps": 40}, "eval": {"max_new_tokens": 8}}
    with pytest.raises(AfloraError) as caught:
        apply_override(raw, "training.max_steps.x=1")
    assert str(caught.value) == "--set 'training.max_steps.x=1': 'max_steps' is not a section"
    with pytest.raises(AfloraError) as caught:
        set_dotted(raw, "eval.max_new_tokens.y", 2, "settings.a.eval.max_new_tokens.y")
    assert str(caught.value) == "settings.a.eval.max_new_tokens.y: 'max_new_tokens' is not a section"
