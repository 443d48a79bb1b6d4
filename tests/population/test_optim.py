"""The stacked optimizer is P torch optimizers with per-member hyperparameters, and a frozen
member does not move at all."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from droptune.population._optim import StackedOptimizer
from droptune.population._optim import stacked_max_norm_


P = 3
SHAPES = [(P, 5, 4), (P, 5)]  # a weight (decayed) and a bias (not decayed)
DECAYED = [True, False]


def f64(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def stacked(seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in SHAPES]


def optimizer(params: list[Tensor], **hyper: Any) -> StackedOptimizer:
    defaults: dict[str, Any] = {
        "kind": "adam",
        "lr": f64([1e-2, 3e-2, 1e-1]),
        "momentum": f64([0.9, 0.5, 0.0]),
        "decoupled": f64([0.0, 0.0, 0.0]),
        "coupled": f64([0.0, 0.0, 0.0]),
    }
    return StackedOptimizer(params, DECAYED, **{**defaults, **hyper})


def random_grads(params: list[Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)


def test_decoupled_l2_shrinks_each_member_by_its_own_factor_exactly() -> None:
    lr, strength = [1e-2, 3e-2, 1e-1], [0.0, 1e-2, 0.5]
    params = stacked()
    before = [p.detach().clone() for p in params]
    opt = optimizer(params, lr=f64(lr), decoupled=f64(strength))
    for param in params:
        param.grad = torch.zeros_like(param)
    opt.step()
    for i in range(P):
        factor = torch.tensor(1.0 - lr[i] * strength[i], dtype=torch.float32)
        assert torch.equal(params[0][i], before[0][i] * factor), i
        assert torch.equal(params[1][i], before[1][i]), "biases are not decayed"
    # ... which is exactly what torch's AdamW does to each member alone
    for i in range(P):
        alone = before[0][i].clone().requires_grad_()
        alone.grad = torch.zeros_like(alone)
        torch.optim.AdamW([alone], lr=lr[i], weight_decay=strength[i]).step()
        assert torch.equal(params[0][i], alone.detach())


@pytest.mark.parametrize(
    ("hyper", "reference"),
    [
        ({}, "adam"),
        ({"decoupled": f64([1e-2, 0.0, 0.3])}, "adamw"),
        ({"coupled": f64([1e-2, 0.0, 0.3])}, "adam+coupled"),
        ({"clip": f64([0.5, float("inf"), 2.0])}, "adam+clip"),
        ({"kind": "sgd"}, "sgd"),
        ({"kind": "sgd", "decoupled": f64([1e-2, 0.0, 0.3])}, "sgd+decoupled"),
    ],
)
@pytest.mark.parametrize("fused", [False, True], ids=["elementwise", "fused"])
def test_each_member_follows_torchs_optimizer(
    hyper: dict[str, Any], reference: str, fused: bool
) -> None:
    """Per-member hyperparameters take the element-wise path; with one learning rate for all
    members Adam's update is the fused kernel (SGD has none), and each member still follows
    torch's own optimizer with its own L2 strength and clipping norm."""
    params = stacked()
    singles = [[p.detach()[i].clone().requires_grad_() for p in params] for i in range(P)]
    if fused:
        hyper = {**hyper, "lr": f64([2e-2] * P), "fused": True}
    opt = optimizer(params, **hyper)
    assert opt._fusable(torch.float32) == (fused and opt.kind == "adam")
    lr = opt.lr.tolist()
    momentum = opt.momentum.tolist()
    decoupled = opt.decoupled.tolist()
    coupled = opt.coupled.tolist()
    clip = opt.clip.tolist() if opt.clip is not None else None
    torch_opts: list[torch.optim.Optimizer] = []
    for i, single in enumerate(singles):
        if reference.startswith("sgd"):
            torch_opts.append(torch.optim.SGD(single, lr=lr[i], momentum=momentum[i]))
        elif reference == "adamw":
            torch_opts.append(
                torch.optim.AdamW(
                    [
                        {"params": [single[0]], "weight_decay": decoupled[i]},
                        {"params": [single[1]], "weight_decay": 0.0},
                    ],
                    lr=lr[i],
                )
            )
        else:
            torch_opts.append(torch.optim.Adam(single, lr=lr[i]))
    for step in range(5):
        random_grads(params, step)
        opt.step()
        for i, single in enumerate(singles):
            for param, stacked_param in zip(single, params, strict=True):
                param.grad = stacked_param.grad[i].clone()  # type: ignore[index]
            with torch.no_grad():
                if reference == "adam+coupled":  # the gradient of λ·Σw² on the weight
                    single[0].grad.add_(single[0], alpha=2 * coupled[i])  # type: ignore[union-attr]
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(single, clip[i])
                if reference == "sgd+decoupled":  # droptune's callback: AdamW's rule
                    single[0].mul_(1 - lr[i] * decoupled[i])
            torch_opts[i].step()
        opt.zero_grad()
    for i, single in enumerate(singles):
        for param, stacked_param in zip(single, params, strict=True):
            torch.testing.assert_close(stacked_param[i], param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_frozen_member_stays_bit_identical(kind: str) -> None:
    params = stacked()
    opt = optimizer(
        params,
        kind=kind,
        decoupled=f64([1e-2, 0.1, 0.0]),
        coupled=f64([0.0, 0.0, 0.1]),
        clip=f64([1.0, 1.0, 1.0]),
    )
    for step in range(3):
        random_grads(params, step)
        opt.step()
    opt.set_active(torch.tensor([True, False, True]))
    frozen = [p.detach()[1].clone() for p in params]
    state = [[s[1].clone() for s in slots] for slots in opt.state]
    steps = opt.steps.clone()
    moving = [p.detach()[0].clone() for p in params]
    for step in range(3, 8):
        random_grads(params, step)  # a gradient for the frozen member too
        opt.step()
        stacked_max_norm_(params[:1], torch.tensor([0.5, 0.5, 0.5]), opt.active)
    for param, before in zip(params, frozen, strict=True):
        assert torch.equal(param[1], before)
    for slots, before_slots in zip(opt.state, state, strict=True):
        for slot, before in zip(slots, before_slots, strict=True):
            assert torch.equal(slot[1], before)
    if kind == "adam":  # bias corrections count each member's own steps
        assert opt.steps[1] == steps[1] == 3 and opt.steps[0] == steps[0] + 5
    assert not torch.equal(params[0][0], moving[0])


def test_keep_reindexes_hyperparameters_and_state() -> None:
    params = stacked()
    opt = optimizer(params)
    random_grads(params, 0)
    opt.step()
    index = torch.tensor([2, 0])
    kept = [p.detach().index_select(0, index).clone().requires_grad_() for p in params]
    state = [[s.index_select(0, index) for s in slots] for slots in opt.state]
    opt.keep(index, kept)
    assert opt.lr.tolist() == [1e-1, 1e-2]
    for slots, before in zip(opt.state, state, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(slots, before, strict=True))


def test_max_norm_is_torch_renorm_per_member() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = torch.randn(P, 6, 4, generator=gen) * 3
    conv = torch.randn(P, 5, 2, 3, 3, generator=gen) * 3
    limits = [0.5, float("inf"), 2.0]
    weights = [linear.clone(), conv.clone()]
    stacked_max_norm_(weights, torch.tensor(limits), torch.ones(P))
    for original, projected in zip((linear, conv), weights, strict=True):
        for i, limit in enumerate(limits):
            if limit == float("inf"):
                assert torch.equal(projected[i], original[i])
                continue
            expected = torch.renorm(original[i], p=2, dim=0, maxnorm=limit)
            torch.testing.assert_close(projected[i], expected)
            assert float(projected[i].flatten(1).norm(dim=1).max()) <= limit + 1e-5


def test_fused_and_elementwise_paths_agree_through_freezing_and_compaction() -> None:
    """A frozen row sends the step to the element-wise path; once compacted away, the fused
    kernel takes over again with every remaining member at its own (equal) step count."""
    runs = []
    for fused in (True, False):
        params = stacked()
        opt = optimizer(params, lr=f64([1e-2] * P), decoupled=f64([1e-2, 0.1, 0.0]), fused=fused)
        paths = []
        for step in range(9):
            if step == 3:
                opt.set_active([True, False, True])
            if step == 6:
                index = torch.tensor([0, 2])
                params = [p.detach().index_select(0, index).requires_grad_() for p in params]
                opt.keep(index, params)
            paths.append(opt._fusable(torch.float32))
            random_grads(params, step)
            opt.step()
            opt.zero_grad()
        runs.append((params, opt.steps.clone(), paths))
    (fused_params, fused_steps, fused_paths), (plain_params, plain_steps, plain_paths) = runs
    assert fused_paths == [True] * 3 + [False] * 3 + [True] * 3
    assert not any(plain_paths)
    assert torch.equal(fused_steps, plain_steps) and fused_steps.tolist() == [9.0, 9.0]
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
