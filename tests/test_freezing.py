"""Freezing scores (Eqs. 2-4), the cubic schedule (Eq. 5) and the Freezer, against hand computations."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from aflora_cli.engine.freezing import Freezer, release_from_optimizer, sensitivity
from aflora_cli.engine.layer import AdapterLinear
from aflora_cli.engine.schedule import freeze_fraction, frozen_target

B1, B2 = 0.85, 0.95

# ---- Eq. 5 -----------------------------------------------------------------------------------------
# T = 100, t_i = 10, t_f = 30: the ramp runs from step 10 to step 70 (60 steps).


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (9, 0.0),  # t_i - 1
        (10, 0.0),  # t_i: 1 - (1 - 0)^3
        (25, 1 - 0.75**3),  # 1 - (1 - 15/60)^3 = 0.578125
        (40, 0.875),  # half-way: 1 - 0.5^3
        (69, 1 - (1 / 60) ** 3),  # T - t_f - 1
        (70, 1.0),  # T - t_f
        (99, 1.0),  # T - 1
        (100, 1.0),  # T
    ],
)
def test_freeze_fraction(step, expected):
    assert freeze_fraction(step, 100, 10, 30) == pytest.approx(expected, abs=1e-12)


def test_freeze_fraction_is_monotone_and_in_range():
    values = [freeze_fraction(t, 100, 10, 30) for t in range(101)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert 0.578 < values[25] < 0.579


def test_freeze_fraction_degenerate_schedule():
    # T - t_i - t_f = 0: no ramp, 0 before t_i, 1 from t_i on, and no division by zero
    assert [freeze_fraction(t, 10, 6, 4) for t in (0, 5, 6, 9, 10)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # T - t_i - t_f < 0: Eq. 5's first case still holds before t_i, "otherwise" (1) after
    assert [freeze_fraction(t, 10, 8, 5) for t in (0, 4, 5, 7, 8, 9)] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # t_i = 0 and t_f = T: everything frozen from the first step
    assert freeze_fraction(0, 10, 0, 10) == 1.0


def test_frozen_target_is_floor():
    assert frozen_target(5, 100, 10, 30, 8) == 0
    assert frozen_target(25, 100, 10, 30, 10) == 5  # 5.78 -> 5, not rounded to 6
    assert frozen_target(25, 100, 10, 30, 8) == 4  # 4.625
    assert frozen_target(40, 100, 10, 30, 8) == 7  # exactly 7.0
    assert frozen_target(40, 100, 10, 30, 10) == 8  # 8.75
    assert frozen_target(69, 100, 10, 30, 10) == 9
    assert frozen_target(70, 100, 10, 30, 10) == 10
    assert frozen_target(99, 100, 10, 30, 0) == 0


# ---- Eqs. 2-4 by hand ------------------------------------------------------------------------------


def _hand_scores(grads: list[list[float]], beta1: float = B1, beta2: float = B2):
    """Plain-Python Eqs. 2-4 for one flattened tensor: EMAs from zero, no bias correction."""
    n = len(grads[0])
    ibar, ubar = [0.0] * n, [0.0] * n
    for g in grads:
        for j in range(n):
            i = abs(g[j])
            ibar[j] = beta1 * ibar[j] + (1 - beta1) * i
            u = abs(i - ibar[j])
            ubar[j] = beta2 * ubar[j] + (1 - beta2) * u
    score = sum(a * b for a, b in zip(ibar, ubar)) / n
    return ibar, ubar, score


GRADS = {  # four steps of fixed gradients for three parameters of different shapes
    "a": [
        [[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]],
        [[0.1, 0.3, -0.2], [1.5, -0.5, 0.0]],
        [[-2.0, 0.0, 0.4], [0.6, 0.6, -0.1]],
        [[0.9, -0.9, 1.1], [0.2, -3.0, 0.05]],
    ],
    "b": [[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, -1.0, 1.0]],
    "c": [[[0.01, -0.02]], [[0.03, 0.0]], [[-0.05, 0.04]], [[0.0, 0.02]]],
}


def _flat(values) -> list[float]:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()


def _params(seed: int = 0) -> dict[str, nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a": nn.Parameter(torch.randn(2, 3, generator=generator)),
        "b": nn.Parameter(torch.randn(4, generator=generator)),
        "c": nn.Parameter(torch.randn(1, 2, generator=generator)),
    }


def test_scores_match_hand_computation():
    params = _params()
    freezer = Freezer(params, total_steps=100, t_i=50, t_f=10)
    for step in range(4):
        for name, param in params.items():
            param.grad = torch.tensor(GRADS[name][step])
        freezer.update_scores(step)
    scores = freezer.current_scores()
    assert set(scores) == {"a", "b", "c"}
    for name in params:
        _, _, expected = _hand_scores([_flat(g) for g in GRADS[name]])
        assert expected > 0
        assert scores[name] == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_scores_after_one_step_closed_form():
    # step 0 from zero EMAs: Ī = (1-β1)|g|, Ū = (1-β2)·β1|g|, s = mean((1-β1)(1-β2)β1 g²)
    param = nn.Parameter(torch.zeros(3))
    freezer = Freezer({"p": param}, total_steps=10, t_i=5, t_f=1)
    param.grad = torch.tensor([1.0, -2.0, 4.0])
    freezer.update_scores(0)
    expected = (1 - B1) * (1 - B2) * B1 * (1 + 4 + 16) / 3
    assert freezer.current_scores()["p"] == pytest.approx(expected, rel=1e-6)


def test_missing_gradient_counts_as_zero():
    params = _params()
    freezer = Freezer(params, total_steps=100, t_i=50, t_f=10)
    for step in range(4):
        for name, param in params.items():
            param.grad = None if (name == "b" and step == 1) else torch.tensor(GRADS[name][step])
        freezer.update_scores(step)
    grads_b = [_flat(g) for g in GRADS["b"]]
    grads_b[1] = [0.0] * 4
    assert freezer.current_scores()["b"] == pytest.approx(_hand_scores(grads_b)[2], rel=1e-5)


def test_custom_betas():
    params = _params()
    freezer = Freezer(params, total_steps=100, t_i=50, t_f=10, beta1=0.5, beta2=0.7)
    for step in range(4):
        for name, param in params.items():
            param.grad = torch.tensor(GRADS[name][step])
        freezer.update_scores(step)
    _, _, expected = _hand_scores([_flat(g) for g in GRADS["a"]], 0.5, 0.7)
    assert freezer.current_scores()["a"] == pytest.approx(expected, rel=1e-5)


def test_sensitivity_kinds():
    grad = torch.tensor([2.0, -3.0, 0.5, -1.0])
    weight = torch.tensor([-0.5, 0.0, 2.0, -4.0])
    assert torch.equal(sensitivity(grad, weight, "grad"), torch.tensor([2.0, 3.0, 0.5, 1.0]))
    assert torch.equal(sensitivity(grad, weight, "weight_grad"), torch.tensor([1.0, 0.0, 1.0, 4.0]))
    assert torch.equal(sensitivity(grad, weight, "grad_over_weight"), torch.tensor([4.0, 0.0, 0.25, 0.25]))


@pytest.mark.parametrize(
    "score, element",
    [
        ("grad", lambda g, w: abs(g)),
        ("weight_grad", lambda g, w: abs(w * g)),
        ("grad_over_weight", lambda g, w: 0.0 if w == 0 else abs(g / w)),
    ],
)
def test_freezer_score_kinds(score, element):
    weights = [[-0.5, 0.0, 2.0], [1.5, -4.0, 0.25]]
    param = nn.Parameter(torch.tensor(weights))
    freezer = Freezer({"p": param}, total_steps=100, t_i=50, t_f=10, score=score)
    per_step = []
    for step in range(3):
        g = GRADS["a"][step]
        param.grad = torch.tensor(g)
        freezer.update_scores(step)
        per_step.append([element(gv, wv) for gv, wv in zip(_flat(g), _flat(weights))])
    _, _, expected = _hand_scores(per_step)
    assert freezer.current_scores()["p"] == pytest.approx(expected, rel=1e-5)


def test_interval_updates_only_on_multiples():
    params = _params()
    freezer = Freezer(params, total_steps=100, t_i=50, t_f=10, interval=3)
    steps = [0, 1, 2, 3]
    for step in steps:
        for name, param in params.items():
            param.grad = torch.tensor(GRADS[name][step])
        freezer.update_scores(step)
    for name in params:
        used = [_flat(GRADS[name][s]) for s in steps if s % 3 == 0]  # steps 0 and 3
        assert freezer.current_scores()[name] == pytest.approx(_hand_scores(used)[2], rel=1e-5)


def test_interval_skipped_steps_leave_scores_alone():
    param = nn.Parameter(torch.zeros(2))
    freezer = Freezer({"p": param}, total_steps=100, t_i=50, t_f=10, interval=2)
    param.grad = torch.tensor([1.0, 1.0])
    freezer.update_scores(1)
    assert freezer.current_scores()["p"] == 0.0
    freezer.update_scores(2)
    assert freezer.current_scores()["p"] > 0.0


# ---- the schedule applied --------------------------------------------------------------------------


def _scaled_params(scales: dict[str, float]) -> tuple[dict[str, nn.Parameter], torch.Tensor]:
    pattern = torch.tensor([[0.3, -1.0, 0.7], [1.2, -0.4, 0.9]])
    params = {name: nn.Parameter(torch.randn(2, 3)) for name in scales}
    return params, pattern


def test_freezing_order_follows_scores_on_schedule():
    # Same gradient pattern times a per-PM scale: every score is scale² × the same number, so the
    # ranking is fixed. T = 10, t_i = 2, t_f = 2, N = 4 -> floor(4·r(t)) = 0,0,0,1,2,3,3,3,4,4 for t = 0..9.
    scales = {"p0": 3.0, "p1": 1.0, "p2": 4.0, "p3": 2.0}
    params, pattern = _scaled_params(scales)
    freezer = Freezer(params, total_steps=10, t_i=2, t_f=2)
    expected_targets = [0, 0, 0, 1, 2, 3, 3, 3, 4, 4]
    assert [frozen_target(t, 10, 2, 2, 4) for t in range(10)] == expected_targets
    frozen_once: set[str] = set()
    for step in range(10):
        for name, param in params.items():
            param.grad = pattern * scales[name]  # frozen ones too: the freezer must ignore them
        freezer.update_scores(step)
        before = freezer.current_scores()
        newly = freezer.apply_schedule(step)
        assert freezer.num_frozen == expected_targets[step]
        newly_names = {n for n, p in params.items() if any(p is q for q in newly)}
        for name in newly_names:
            assert freezer.freeze_log[name] == step
            assert freezer.freeze_score[name] == pytest.approx(before[name])
            # the lowest remaining scores went first
            assert all(before[name] <= before[other] for other in before if other not in newly_names)
        for name in frozen_once:  # a frozen PM never thaws
            assert not params[name].requires_grad
        frozen_once |= newly_names
        for name, param in params.items():
            assert param.requires_grad == (name not in frozen_once)
            if name in newly_names:
                assert param.grad is None
        assert set(freezer.current_scores()) == set(params) - frozen_once
    assert freezer.freeze_log == {"p1": 3, "p3": 4, "p0": 5, "p2": 8}
    assert freezer.num_frozen == freezer.num_units == 4
    assert freezer.apply_schedule(9) == []


def test_scores_of_remaining_units_survive_a_freeze():
    params = _params()
    reference = {name: nn.Parameter(p.detach().clone()) for name, p in params.items()}
    freezer = Freezer(params, total_steps=10, t_i=1, t_f=1)  # N = 3: one freezes at step 2
    untouched = Freezer(reference, total_steps=1000, t_i=999, t_f=0)  # never freezes
    for step in range(4):
        for group in (params, reference):
            for name, param in group.items():
                if param.requires_grad:
                    param.grad = torch.tensor(GRADS[name][step])
        freezer.update_scores(step)
        untouched.update_scores(step)
        freezer.apply_schedule(step)
    kept = freezer.current_scores()
    assert len(kept) < 3
    for name, value in kept.items():
        assert value == pytest.approx(untouched.current_scores()[name], rel=1e-6)


def test_together_freezes_a_module_at_once():
    generator = torch.Generator().manual_seed(0)
    params = {
        "m0.lora_A": nn.Parameter(torch.randn(2, 3, generator=generator)),
        "m0.lora_B": nn.Parameter(torch.randn(4, 2, generator=generator)),
        "m1.lora_A": nn.Parameter(torch.randn(2, 3, generator=generator)),
        "m1.lora_B": nn.Parameter(torch.randn(4, 2, generator=generator)),
    }
    grads = {
        "m0.lora_A": [[0.1, -0.2, 0.3], [0.0, 0.2, -0.1]],
        "m0.lora_B": [[0.2, 0.1], [-0.3, 0.0], [0.1, 0.1], [0.05, -0.05]],
        "m1.lora_A": [[1.0, -2.0, 0.5], [0.7, 0.0, -1.5]],  # module 1: much larger gradients
        "m1.lora_B": [[0.9, 1.1], [-0.6, 2.0], [0.3, -1.0], [0.8, 0.4]],
    }
    # T = 6, t_i = 1, t_f = 1, N = 2 units -> floor(2·r(t)) = 0, 0, 1, 1, 1, 2 for t = 0..5
    freezer = Freezer(params, total_steps=6, t_i=1, t_f=1, together=True)
    assert freezer.num_units == 2
    for step in range(6):
        for name, param in params.items():
            if param.requires_grad:
                param.grad = torch.tensor(grads[name]) * (1 + 0.1 * step)
        freezer.update_scores(step)
        if step == 1:
            scores = freezer.current_scores()
            for module in ("m0", "m1"):  # one score per unit: mean over A's and B's elements together
                seqs = [
                    _flat(torch.tensor(grads[f"{module}.lora_A"]) * (1 + 0.1 * s))
                    + _flat(torch.tensor(grads[f"{module}.lora_B"]) * (1 + 0.1 * s))
                    for s in range(2)
                ]
                expected = _hand_scores(seqs)[2]
                assert scores[f"{module}.lora_A"] == pytest.approx(expected, rel=1e-5)
                assert scores[f"{module}.lora_B"] == pytest.approx(expected, rel=1e-5)
        freezer.apply_schedule(step)
        assert freezer.num_frozen == [0, 0, 1, 1, 1, 2][step]
    assert freezer.freeze_log == {"m0.lora_A": 2, "m0.lora_B": 2, "m1.lora_A": 5, "m1.lora_B": 5}


def test_independent_counts_each_pm():
    params = {f"m{i}.lora_{x}": nn.Parameter(torch.randn(2, 2)) for i in range(2) for x in "AB"}
    assert Freezer(params, total_steps=10, t_i=1, t_f=1).num_units == 4
    assert Freezer(params, total_steps=10, t_i=1, t_f=1, together=True).num_units == 2


def test_already_frozen_matrices_start_frozen():
    params = _params()
    params["b"].requires_grad_(False)
    freezer = Freezer(params, total_steps=10, t_i=1, t_f=1)
    assert freezer.num_frozen == 1
    assert set(freezer.current_scores()) == {"a", "c"}


# ---- with a real optimizer -------------------------------------------------------------------------


def _tiny_adapted_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(AdapterLinear(nn.Linear(6, 8), 2), nn.Tanh(), AdapterLinear(nn.Linear(8, 3), 2))
    with torch.no_grad():
        for module in (model[0], model[2]):
            module.lambda_b.fill_(0.5)  # so that A and B receive gradient
    return model


def test_release_from_optimizer_with_adamw():
    model = _tiny_adapted_model()
    matrices = {f"{i}.lora_{x}": getattr(model[i], f"lora_{x}") for i in (0, 2) for x in "AB"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    # T = 12, t_i = 3, t_f = 3, N = 4 -> floor(4·r(t)) = 0,0,0,0,1,2,3,3,3,4,4,4
    freezer = Freezer(matrices, total_steps=12, t_i=3, t_f=3)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 3, generator=generator)
    snapshots: dict[str, torch.Tensor] = {}
    vectors = [model[0].lambda_d, model[0].lambda_b, model[2].lambda_d, model[2].lambda_b]
    for step in range(12):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        freezer.update_scores(step)
        newly = freezer.apply_schedule(step)
        for param in newly:
            assert param in optimizer.state  # it had optimizer state, which release frees
        release_from_optimizer(optimizer, newly)
        for name, param in matrices.items():
            if freezer.freeze_log[name] == step:
                snapshots[name] = param.detach().clone()
        active = {name: p.detach().clone() for name, p in matrices.items() if name not in snapshots}
        vector_before = [v.detach().clone() for v in vectors]
        optimizer.step()
        grouped = [p for group in optimizer.param_groups for p in group["params"]]
        for name, snapshot in snapshots.items():
            param = matrices[name]
            assert torch.equal(param.detach(), snapshot), name  # bit-identical from its freeze on
            assert not param.requires_grad and param.grad is None
            assert all(p is not param for p in grouped)
            assert all(p is not param for p in optimizer.state)
        for name, before in active.items():
            assert not torch.equal(matrices[name].detach(), before), name  # still training
        for vector, before in zip(vectors, vector_before):
            assert not torch.equal(vector.detach(), before)
    assert freezer.freeze_log["0.lora_A"] is not None and len(snapshots) == 4
    assert sorted(freezer.freeze_log.values()) == [4, 5, 6, 9]
    assert len(grouped) == 4  # only the four vectors are left


def test_state_dict_round_trip():
    def run(freezer, params, steps):
        for step in steps:
            generator = torch.Generator().manual_seed(100 + step)
            for name, param in params.items():
                grad = torch.randn(param.shape, generator=generator) * (1 + list(params).index(name))
                if param.requires_grad:
                    param.grad = grad
            freezer.update_scores(step)
            freezer.apply_schedule(step)

    def make():
        params = {f"p{i}": nn.Parameter(torch.full((3, 2), float(i + 1))) for i in range(5)}
        return params, Freezer(params, total_steps=20, t_i=3, t_f=5)

    params1, freezer1 = make()
    run(freezer1, params1, range(6))
    assert 0 < freezer1.num_frozen < 5
    buffer = io.BytesIO()
    torch.save(freezer1.state_dict(), buffer)
    buffer.seek(0)

    params2, freezer2 = make()
    freezer2.load_state_dict(torch.load(buffer, weights_only=True))
    assert freezer2.freeze_log == freezer1.freeze_log
    assert freezer2.freeze_score == freezer1.freeze_score
    assert {n: p.requires_grad for n, p in params2.items()} == {n: p.requires_grad for n, p in params1.items()}
    assert freezer2.current_scores() == freezer1.current_scores()

    # the control: a freezer resumed without the state (EMAs from zero, nothing frozen) diverges
    params3, freezer3 = make()
    run(freezer3, params3, [6])
    run(freezer1, params1, [6])
    run(freezer2, params2, [6])
    assert freezer2.current_scores() == freezer1.current_scores()
    assert freezer3.current_scores() != freezer1.current_scores()
    for step in range(7, 20):
        run(freezer1, params1, [step])
        run(freezer2, params2, [step])
        assert freezer2.current_scores() == freezer1.current_scores()
        assert freezer2.freeze_log == freezer1.freeze_log
    assert all(v is not None for v in freezer1.freeze_log.values())
    assert freezer3.freeze_log != freezer2.freeze_log


def test_load_state_dict_rejects_other_matrices():
    freezer = Freezer(_params(), total_steps=10, t_i=1, t_f=1)
    other = Freezer({"x": nn.Parameter(torch.zeros(2))}, total_steps=10, t_i=1, t_f=1)
    with pytest.raises(ValueError):
        freezer.load_state_dict(other.state_dict())


def test_empty_freezer_is_harmless():
    freezer = Freezer({}, total_steps=10, t_i=1, t_f=1)
    freezer.update_scores(0)
    assert freezer.apply_schedule(9) == []
    assert freezer.current_scores() == {}
    assert freezer.num_units == freezer.num_frozen == 0


@pytest.mark.parametrize("power", [2, 3])
def test_power_sets_the_ramp_of_eq5(power):
    # T = 20, t_i = 4, t_f = 6: the ramp runs over steps 4..13, (t - t_i) / 10 of the way at step t
    for step in range(4, 14):
        assert freeze_fraction(step, 20, 4, 6, power) == pytest.approx(1 - (1 - (step - 4) / 10) ** power)
    assert frozen_target(9, 20, 4, 6, 24, power=2) == 18  # floor((1 - 0.5 ** 2) * 24)
    assert frozen_target(9, 20, 4, 6, 24) == 21  # the paper's cubic: floor((1 - 0.5 ** 3) * 24)


def test_freezer_follows_a_quadratic_schedule():
    matrices = {f"m{i}.lora_A": nn.Parameter(torch.randn(2, 3)) for i in range(8)}
    freezer = Freezer(matrices, total_steps=10, t_i=2, t_f=2, power=2)
    for step in range(10):
        for param in matrices.values():
            param.grad = torch.randn_like(param) if param.requires_grad else None
        freezer.update_scores(step)
        freezer.apply_schedule(step)
        assert freezer.num_frozen == frozen_target(step, 10, 2, 2, 8, power=2)
