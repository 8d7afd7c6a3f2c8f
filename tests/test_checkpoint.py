"""The checkpoint directory: safetensors weights + JSON manifest, atomic writes, clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open

from aflora_cli.engine.base_model import fingerprint
from aflora_cli.engine.checkpoint import atomic_directory, load_weights_into, read_weights, save_checkpoint
from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import adapter_modules, inject_adapters, unfreeze_head
from aflora_cli.engine.manifest import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, read_manifest
from aflora_cli.errors import AfloraError
from tiny_models import HIDDEN, INTERMEDIATE, LAYERS, NUM_LABELS, sample_batch, tiny_bert

SHAPES = {  # (in, out) of every adapted BERT linear
    "attention.self.query": (HIDDEN, HIDDEN),
    "attention.self.key": (HIDDEN, HIDDEN),
    "attention.self.value": (HIDDEN, HIDDEN),
    "attention.output.dense": (HIDDEN, HIDDEN),
    "intermediate.dense": (HIDDEN, INTERMEDIATE),
    "output.dense": (INTERMEDIATE, HIDDEN),
}


def _adapted_bert(method: str = "aflora", rank: int = 4, init_seed: int = 0):
    model = tiny_bert(0)
    torch.manual_seed(init_seed)
    inject_adapters(model, AdapterConfig(method=method, rank=rank))
    head = unfreeze_head(model)
    return model, head


def _randomise(model, seed: int) -> None:
    """Give every adapter tensor and the head values no fresh model would have."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in _tensors(model, unfreeze_head(model)):
            params[name].copy_(torch.randn(params[name].shape, generator=generator))


def _tensors(model, head) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in adapter_modules(model).items():
        for t in ("lora_A", "lora_B", "lambda_d", "lambda_b"):
            if getattr(module, t) is not None:
                out[f"{name}.{t}"] = getattr(module, t).detach().clone()
    params = dict(model.named_parameters())
    out.update({n: params[n].detach().clone() for n in head})
    return out


def test_round_trip_is_bit_exact(tmp_path):
    model, head = _adapted_bert(init_seed=0)
    _randomise(model, 1)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, head, {"method": "aflora", "rank": 4})

    manifest = read_manifest(ckpt)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["method"] == "aflora" and manifest["rank"] == 4

    fresh, fresh_head = _adapted_bert(init_seed=5)
    saved = _tensors(model, head)
    before = _tensors(fresh, fresh_head)
    assert set(before) == set(saved)
    assert not any(torch.equal(before[n], saved[n]) for n in saved)  # the load has work to do

    load_weights_into(fresh, read_weights(ckpt), fresh_head, ckpt)
    after = _tensors(fresh, fresh_head)
    for name, tensor in saved.items():
        assert torch.equal(after[name], tensor), name
    batch = sample_batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_safetensors_keys_and_shapes(tmp_path):
    model, head = _adapted_bert(rank=4)
    save_checkpoint(tmp_path / "ckpt", model, head, {})
    with safe_open(str(tmp_path / "ckpt" / WEIGHTS_FILE), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    expected = {}
    for layer in range(LAYERS):
        for suffix, (fan_in, fan_out) in SHAPES.items():
            path = f"bert.encoder.layer.{layer}.{suffix}"
            expected[f"{path}.lora_A"] = (4, fan_in)
            expected[f"{path}.lora_B"] = (fan_out, 4)
            expected[f"{path}.lambda_d"] = (4,)
            expected[f"{path}.lambda_b"] = (fan_out,)
    expected["classifier.weight"] = (NUM_LABELS, HIDDEN)
    expected["classifier.bias"] = (NUM_LABELS,)
    assert shapes == expected


def test_lora_checkpoint_has_no_lambdas(tmp_path):
    model, head = _adapted_bert(method="lora")
    save_checkpoint(tmp_path / "ckpt", model, head, {"method": "lora"})
    keys = set(read_weights(tmp_path / "ckpt"))
    assert not any("lambda" in key for key in keys)
    assert (
        len([k for k in keys if k.endswith(".lora_A")]) == len([k for k in keys if k.endswith(".lora_B")]) == 6 * LAYERS
    )
    assert {"classifier.weight", "classifier.bias"} <= keys


def test_extra_files_written_into_the_checkpoint(tmp_path):
    model, head = _adapted_bert()
    save_checkpoint(tmp_path / "ckpt", model, head, {}, extra=lambda d: (d / "training_state.pt").write_bytes(b"x"))
    assert (tmp_path / "ckpt" / "training_state.pt").read_bytes() == b"x"


def test_atomic_directory_replaces_and_leaves_nothing_behind(tmp_path):
    model, head = _adapted_bert()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, head, {"n": 1})
    save_checkpoint(ckpt, model, head, {"n": 2})
    assert read_manifest(ckpt)["n"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])


def test_atomic_directory_keeps_old_checkpoint_when_body_raises(tmp_path):
    model, head = _adapted_bert()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, head, {"n": 1})
    old_bytes = (ckpt / WEIGHTS_FILE).read_bytes()
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(ckpt) as tmp:
        assert tmp != ckpt and tmp.parent == ckpt.parent
        (tmp / MANIFEST_FILE).write_text("{}")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert read_manifest(ckpt)["n"] == 1
    assert (ckpt / WEIGHTS_FILE).read_bytes() == old_bytes

    # a save whose `extra` fails does not replace it either
    def failing(_):
        raise OSError("disk full")

    with pytest.raises(AfloraError, match=r"could not write the checkpoint .*ckpt: disk full; .* still holds the prev"):
        save_checkpoint(ckpt, model, head, {"n": 3}, extra=failing)
    assert read_manifest(ckpt)["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_directory_fresh_target(tmp_path):
    target = tmp_path / "deep" / "new"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("hi")
    assert (target / "f").read_text() == "hi"
    assert [p.name for p in target.parent.iterdir()] == ["new"]
    with pytest.raises(ValueError), atomic_directory(tmp_path / "never") as tmp:
        raise ValueError
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"]


@pytest.fixture
def saved(tmp_path):
    model, head = _adapted_bert()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, head, {"method": "aflora"})
    return ckpt


def test_truncated_weights(saved):
    file = saved / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(AfloraError, match=WEIGHTS_FILE) as info:
        read_weights(saved)
    assert str(file) in str(info.value)


@pytest.mark.parametrize("garbage", [b"not a safetensors file at all, just text" * 10, b"\x00\x01", b""])
def test_garbage_weights(saved, garbage):
    file = saved / WEIGHTS_FILE
    file.write_bytes(garbage)
    with pytest.raises(AfloraError) as info:
        read_weights(saved)
    assert str(file) in str(info.value)


def test_missing_weights(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(AfloraError, match=WEIGHTS_FILE):
        read_weights(saved)


def test_missing_manifest(saved):
    (saved / MANIFEST_FILE).unlink()
    with pytest.raises(AfloraError, match=MANIFEST_FILE):
        read_manifest(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(AfloraError, match="not a checkpoint directory"):
        read_manifest(tmp_path / "nothing-here")


@pytest.mark.parametrize("text", ["{not json", "", "\udcff"])
def test_bad_manifest_json(saved, text):
    file = saved / MANIFEST_FILE
    file.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AfloraError) as info:
        read_manifest(saved)
    assert str(file) in str(info.value)


@pytest.mark.parametrize("content", [{"format_version": 99}, {"method": "aflora"}, [1, 2], "1"])
def test_wrong_format_version(saved, content):
    (saved / MANIFEST_FILE).write_text(json.dumps(content))
    with pytest.raises(AfloraError, match="format_version"):
        read_manifest(saved)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model, head = _adapted_bert(rank=4)
    _randomise(model, 3)  # so that any tensor copied before the error would show
    ckpt = tmp_path / "r4"
    save_checkpoint(ckpt, model, head, {"rank": 4})
    other, other_head = _adapted_bert(rank=8)
    before = _tensors(other, other_head)
    tensors = read_weights(ckpt)
    mismatched = {name for name, tensor in tensors.items() if tensor.shape != before[name].shape}
    assert mismatched and all(n.endswith((".lora_A", ".lora_B", ".lambda_d")) for n in mismatched)
    with pytest.raises(AfloraError) as info:
        load_weights_into(other, tensors, other_head, ckpt)
    message = str(info.value)
    assert str(ckpt) in message
    named = [n for n in mismatched if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", message)]
    assert len(named) == 1, message
    # a failed load leaves the model as it was, not half-overwritten
    after = _tensors(other, other_head)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_name_mismatch(tmp_path):
    model, head = _adapted_bert(method="lora")
    save_checkpoint(tmp_path / "lora", model, head, {})
    other, other_head = _adapted_bert(method="aflora")
    with pytest.raises(AfloraError, match="lambda_"):
        load_weights_into(other, read_weights(tmp_path / "lora"), other_head, tmp_path / "lora")
    tensors = read_weights(tmp_path / "lora")
    tensors["something.extra"] = torch.zeros(1)
    model2, head2 = _adapted_bert(method="lora")
    with pytest.raises(AfloraError, match=r"unexpected something\.extra"):
        load_weights_into(model2, tensors, head2, tmp_path / "lora")


def test_fingerprint(tmp_path):
    tiny_bert(0).save_pretrained(tmp_path / "m0")
    tiny_bert(1).save_pretrained(tmp_path / "m1")
    a, b = fingerprint(tmp_path / "m0"), fingerprint(tmp_path / "m1")
    assert a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert a != b
    assert fingerprint(tmp_path / "m0") == a  # stable for the same directory
    shutil.copytree(tmp_path / "m0", tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == a  # depends on content, not on the path
