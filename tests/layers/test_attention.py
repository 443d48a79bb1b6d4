"""SelfAttention (reference sheet §1.10, pitfall 2): attention-prob dropout that is off in eval."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers import SelfAttention


DIM, HEADS, T = 8, 2, 5


def _reference(
    attn: SelfAttention, x: Tensor, causal: bool = False, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """softmax(QKᵀ/√d)V by hand with the module's weights, then the output projection.

    Returns the output, the attention probabilities (N, H, T, T) and V (N, H, T, Dh).
    """
    n, length, dim = x.shape
    heads = attn.num_heads
    dh = dim // heads
    with torch.no_grad():
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(dim, dim=-1)
        q, k, v = (z.reshape(n, length, heads, dh).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dh)
        if causal:
            later = torch.ones(length, length, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(later, float("-inf"))
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        probs = scores.softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(n, length, dim)
        return out @ attn.proj.weight.T + attn.proj.bias, probs, v


def _make(**kwargs: object) -> SelfAttention:
    torch.manual_seed(0)
    return SelfAttention(DIM, HEADS, **kwargs)  # type: ignore[arg-type]


def test_eval_is_deterministic_even_with_dropout() -> None:
    attn = _make(attn_dropout=0.5, proj_dropout=0.3)
    x = torch.randn(3, T, DIM)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))
    # Only attention dropout: still stochastic in training.
    attn = _make(attn_dropout=0.5).train()
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    assert torch.equal(attn(x), attn(x))


def test_zero_dropout_train_equals_eval() -> None:
    attn = _make()
    x = torch.randn(3, T, DIM)
    train_out = attn.train()(x)
    assert torch.equal(train_out, attn.eval()(x))


@pytest.mark.parametrize(
    "case", ["plain", "causal", "bool_mask", "float_mask"], ids=lambda c: str(c)
)
def test_eval_matches_hand_computation(case: str) -> None:
    attn = _make(attn_dropout=0.5, proj_dropout=0.5).eval()
    x = torch.randn(3, T, DIM)
    mask = None
    if case == "bool_mask":
        mask = torch.rand(T, T) > 0.3
        mask |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    elif case == "float_mask":
        mask = torch.randn(T, T)
    causal = case == "causal"
    ref, _, _ = _reference(attn, x, causal=causal, mask=mask)
    out = attn(x, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_attention_dropout_is_unbiased() -> None:
    torch.manual_seed(0)
    p = 0.5
    attn = _make(attn_dropout=p).train()
    x0 = torch.randn(1, T, DIM)
    n = 4000
    with torch.no_grad():
        samples = attn(x0.expand(n, T, DIM)).double()  # independent masks per batch element
    expected, probs, v = _reference(attn, x0)
    # out_i = b_i + Σ_{h,t'} a_{h,t'} m_{h,t'} c_{i,h,t'} / (1-p), with c_{i,h,t'} =
    # Σ_d P_{i,(h,d)} v_{h,t',d} and independent m ~ Bernoulli(1-p) per (query, head, key):
    # Var(out_i) = p/(1-p) Σ_{h,t'} a_{h,t'}² c_{i,h,t'}² ; sigma_mean = sqrt(Var / n).
    dh = DIM // HEADS
    proj = attn.proj.weight.detach().double().reshape(DIM, HEADS, dh)  # (i, h, d)
    c = torch.einsum("ihd,hsd->ihs", proj, v[0].double())  # (i, h, t')
    a = probs[0].double()  # (h, t, t')
    var = p / (1 - p) * torch.einsum("hts,ihs->ti", a.pow(2), c.pow(2))  # (t, i)
    sigma = (var / n).sqrt()
    err = (samples.mean(0) - expected[0].double()).abs()
    assert bool((err < 5 * sigma).all()), (err / sigma).max()
    # And the spread is the predicted one. The sample variance has relative standard error
    # sqrt((κ - 1)/n), κ the kurtosis; a weighted sum of independent symmetric Bernoullis
    # (p = 0.5) has κ <= 3, so sigma_rel <= sqrt(2/n).
    ratio = samples.var(0) / var
    assert bool(((ratio - 1).abs() < 5 * math.sqrt(2 / n)).all()), ratio


def test_population_member_with_zero_rate_is_deterministic() -> None:
    attn = _make(attn_dropout=torch.tensor([0.0, 0.5]))
    x = torch.randn(2, 3, T, DIM)  # (P, N, T, D)
    attn.eval()
    ref = attn(x)
    assert ref.shape == (2, 3, T, DIM)
    # Per member, the eval output is the single-model computation.
    for member in range(2):
        torch.testing.assert_close(ref[member], _reference(attn, x[member])[0], rtol=0, atol=1e-5)
    attn.train()
    out1, out2 = attn(x), attn(x)
    assert torch.equal(out1[0], out2[0])
    torch.testing.assert_close(out1[0], ref[0], rtol=0, atol=1e-5)
    assert not torch.allclose(out1[1], out2[1])
    assert not torch.allclose(out1[1], ref[1])


@pytest.mark.parametrize("case", ["causal", "bool_mask", "float_mask"])
def test_population_path_handles_masks_like_sdpa(case: str) -> None:
    # Training with a rate tensor takes the explicit-softmax path; with rates 0 it must agree with
    # the SDPA path used in eval.
    attn = _make(attn_dropout=torch.tensor([0.0, 0.0]))
    x = torch.randn(2, 3, T, DIM)
    mask = None
    if case == "bool_mask":
        mask = torch.rand(T, T) > 0.3
        mask |= torch.eye(T, dtype=torch.bool)
    elif case == "float_mask":
        mask = torch.randn(T, T)
    kwargs = {"attn_mask": mask, "is_causal": case == "causal"}
    train_out = attn.train()(x, **kwargs)
    eval_out = attn.eval()(x, **kwargs)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=1e-5)


def test_population_needs_leading_axis() -> None:
    attn = _make(attn_dropout=torch.tensor([0.1, 0.5])).train()
    with pytest.raises(InputShapeError):
        attn(torch.randn(3, 2, T, DIM))


@pytest.mark.parametrize("population", [False, True])
def test_is_causal_ignores_later_positions(population: bool) -> None:
    if population:
        attn = _make(attn_dropout=torch.tensor([0.0, 0.0])).train()
        x = torch.randn(2, 3, T, DIM)
    else:
        attn = _make(attn_dropout=0.5).eval()
        x = torch.randn(3, T, DIM)
    for cut in range(1, T):
        changed = x.clone()
        changed[..., cut:, :] += torch.randn_like(changed[..., cut:, :])
        out, out_changed = attn(x, is_causal=True), attn(changed, is_causal=True)
        torch.testing.assert_close(out[..., :cut, :], out_changed[..., :cut, :], rtol=0, atol=1e-6)
        assert not torch.allclose(out[..., cut, :], out_changed[..., cut, :])
    # Without the flag, earlier positions do see later ones.
    out, out_changed = attn(x), attn(changed)
    assert not torch.allclose(out[..., 0, :], out_changed[..., 0, :])


def test_dim_not_divisible_by_heads() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        SelfAttention(10, 3)
    with pytest.raises(ConfigError):
        SelfAttention(8, 2, attn_dropout=1.0)


def test_raw_sdpa_dropout_ignores_eval() -> None:
    """The pitfall SelfAttention fixes: SDPA's dropout_p knows nothing about ``.eval()``."""

    class Naive(nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    naive = Naive().eval()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, T, DIM // HEADS) for _ in range(3))
    assert not naive.training
    assert not torch.allclose(naive(q, k, v), naive(q, k, v))
