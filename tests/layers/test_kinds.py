"""Statistical and exact tests of every activation dropout kind with a float rate.

Statistical assertions follow docs/reference section 1.14: a seeded generator, large tensors and
the bound ``|estimate - expected| < 5σ`` with σ derived in the test from n and p (the formula is
written next to each assertion). Exact properties (kept value == x / (1 - p), mask shared over
time, eval identity, ...) are checked with float rounding only.
"""

from __future__ import annotations

import math
import warnings

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest
import torch
from torch import Tensor
from torch import nn
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers import DROPOUT_KINDS
from droptune.layers import AlphaDropout
from droptune.layers import DropBlock
from droptune.layers import Dropout
from droptune.layers import DropoutEmbedding
from droptune.layers import DropPath
from droptune.layers import EmbeddingDropout
from droptune.layers import GaussianDropout
from droptune.layers import LockedDropout
from droptune.layers import NoDropout
from droptune.layers import SpatialDropout
from droptune.layers import make_dropout
from tests.layers._stats import SHAPES
from tests.layers._stats import assert_fraction
from tests.layers._stats import close


# SELU constants (Klambauer et al. 2017), written out here independently of the source.
SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
ALPHA_PRIME = -SELU_LAMBDA * SELU_ALPHA

EXPECTED_KINDS = {
    "none": NoDropout,
    "standard": Dropout,
    "spatial": SpatialDropout,
    "variational": LockedDropout,
    "gaussian": GaussianDropout,
    "alpha": AlphaDropout,
    "dropblock": DropBlock,
    "droppath": DropPath,
    "embedding": EmbeddingDropout,
}

EXPECTED_OPTIONS = {
    "none": [],
    "standard": [],
    "spatial": [],
    "variational": ["batch_first"],
    "gaussian": [],
    "alpha": ["channel"],
    "dropblock": ["block_size", "couple_channels"],
    "droppath": [],
    "embedding": [],
}


# --------------------------------------------------------------------------------------------
# helpers


def alpha_dropped_value(p: float) -> float:
    """a·α' + b with a = ((1-p)(1+pα'²))^(-1/2), b = -a·α'·p (Klambauer et al. 2017)."""
    a = ((1 - p) * (1 + p * ALPHA_PRIME**2)) ** -0.5
    b = -a * ALPHA_PRIME * p
    return a * ALPHA_PRIME + b


def most_frequent(y: Tensor, sample: int = 1_000_000) -> tuple[float, int]:
    """The most frequent value among the first ``sample`` elements (sorting all of a 4e6
    tensor is slow) and how often it occurs in the whole of ``y``."""
    flat = y.flatten()
    values, counts = flat[:sample].unique(return_counts=True)
    value = values[counts.argmax()]
    return float(value), int((flat == value).sum())


def dropblock_expected_fraction(p: float, k: int, spatial: tuple[int, ...]) -> float:
    """Expected dropped fraction of DropBlock's documented scheme, for an odd (clamped) k.

    Seeds are Bernoulli(γ) with γ = p·numel/k^d/valid at every position; a seed at i drops the
    positions within k//2 of it on every axis (clipped at the border). A position is kept iff no
    seed covers it: P(kept) = (1-γ)^(number of seed positions covering it).
    """
    ks = [min(k, s) for s in spatial]
    assert all(kk % 2 == 1 for kk in ks)
    valid = math.prod(s - kk + 1 for s, kk in zip(spatial, ks, strict=True))
    gamma = min(1.0, p * math.prod(spatial) / math.prod(ks) / valid)
    covering = torch.ones(())
    for s, kk in zip(spatial, ks, strict=True):
        j = torch.arange(s, dtype=torch.float64)
        h = kk // 2
        count = torch.minimum(j, torch.tensor(h)) + torch.minimum(s - 1 - j, torch.tensor(h)) + 1
        covering = covering.unsqueeze(-1) * count
    return float(1 - ((1 - gamma) ** covering).mean())


def is_union_of_blocks(dropped: Tensor, k: int) -> bool:
    """Whether each sample's 0/1 map ``dropped`` ([B, *spatial], 1-D to 3-D) is a union of
    k-wide windows (k×k squares in 2-D, k×k×k cubes in 3-D) clipped at the border.

    Morphological opening with a k-window, treating outside positions as dropped: erosion keeps
    the anchors whose whole window is dropped, dilation re-grows the windows from those anchors.
    A union of (clipped) windows is exactly invariant; an isolated dropped unit is removed.
    """
    dims = dropped.dim() - 1
    spatial = tuple(dropped.shape[1:])
    ks = [min(k, s) for s in spatial]
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    z = dropped.unsqueeze(1).to(torch.float32)

    def pad(t: Tensor, value: float) -> Tensor:
        widths = [w for kk in reversed(ks) for w in (kk - 1, kk - 1)]
        return F.pad(t, widths, value=value)

    eroded = -pool(-pad(z, 1.0), ks, stride=1)  # anchors of fully dropped windows
    opened = pool(pad(eroded, 0.0), ks, stride=1)  # back to the padded size
    for axis, (s, kk) in enumerate(zip(spatial, ks, strict=True), start=2):
        opened = opened.narrow(axis, kk - 1, s)
    return torch.equal(opened, z)


def positive(shape: tuple[int, ...]) -> Tensor:
    return torch.rand(shape) + 0.5  # in [0.5, 1.5): no zeros, so zeros in y mark drops


# --------------------------------------------------------------------------------------------
# standard


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_standard_zero_fraction_and_kept_values(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5
    y = Dropout(p)(x)
    kept = y != 0
    # σ = sqrt(p(1-p)/n), n = 1e6 elements
    assert_fraction(int((~kept).sum()), x.numel(), p, "zero fraction")
    assert close(y[kept], x[kept] / (1 - p)).all()


def test_standard_mean_and_variance_for_constant_input() -> None:
    torch.manual_seed(1)
    x, p, n = 3.0, 0.2, 1_000_000
    q = 1 - p
    y = Dropout(p)(torch.full((n,), x))
    mean, var = float(y.double().mean()), float(y.double().var())
    # σ_mean = |x|·sqrt(p/(1-p))/sqrt(n)
    sigma_mean = abs(x) * math.sqrt(p / q) / math.sqrt(n)
    assert abs(mean - x) < 5 * sigma_mean
    # Var[y] = x²p/(1-p); σ of the sample variance ≈ sqrt((μ4 - σ⁴)/n), with the fourth central
    # moment of x·Bern(q)/q: μ4 = x⁴(p⁴/q³ + p)
    expected_var = x**2 * p / q
    mu4 = x**4 * (p**4 / q**3 + p)
    sigma_var = math.sqrt((mu4 - expected_var**2) / n)
    assert abs(var - expected_var) < 5 * sigma_var, (var, expected_var, sigma_var)


def test_standard_eval_returns_the_same_tensor() -> None:
    layer = Dropout(0.5).eval()
    x = torch.randn(8, 8)
    assert layer(x) is x


def test_standard_zero_rate_is_identity_in_training() -> None:
    layer = Dropout(0.0)
    assert layer.training
    x = torch.randn(8, 8)
    assert layer(x) is x


def test_standard_gradient_flows_only_through_kept_units() -> None:
    torch.manual_seed(2)
    p = 0.4
    x = (torch.rand(200, 50) + 0.5).requires_grad_()
    y = Dropout(p)(x)
    y.sum().backward()
    assert x.grad is not None
    mask = (y != 0).to(x.dtype)
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(x.grad, mask / (1 - p))


def test_standard_draws_a_fresh_mask_each_call() -> None:
    torch.manual_seed(3)
    layer = Dropout(0.5)
    x = torch.ones(64, 64)
    assert not torch.equal(layer(x), layer(x))


# --------------------------------------------------------------------------------------------
# spatial


@pytest.mark.parametrize(
    "shape", [(200, 100, 6), (100, 100, 3, 4), (100, 100, 2, 2, 3)], ids=["1d", "2d", "3d"]
)
def test_spatial_drops_whole_channels(shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    p = 0.3
    x = positive(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch deprecation warning for any rank
        y = SpatialDropout(p)(x)
    assert y.shape == x.shape
    ys, xs = y.reshape(shape[0], shape[1], -1), x.reshape(shape[0], shape[1], -1)
    dropped = (ys == 0).all(-1)
    kept = close(ys, xs / (1 - p)).all(-1)
    assert (dropped | kept).all(), "a channel is neither all-0 nor all-x/(1-p)"
    # count channels, not elements: n = N·C, σ = sqrt(p(1-p)/n)
    assert_fraction(int(dropped.sum()), shape[0] * shape[1], p, "dropped channel fraction")


def test_spatial_3d_input_emits_no_warning_and_is_channelwise() -> None:
    torch.manual_seed(5)
    x = torch.ones(16, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = SpatialDropout(0.5)(x)
    # channel-wise 1-D semantics: each (n, c) row constant along L
    assert torch.equal(y, y[..., :1].expand_as(y))


@pytest.mark.parametrize("shape", [(4, 5), (2, 2, 2, 2, 2, 2)], ids=["2d", "6d"])
def test_spatial_rejects_unsupported_ranks(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputShapeError) as err:
        SpatialDropout(0.5)(torch.ones(shape))
    message = str(err.value)
    for expected in ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)", str(tuple(shape))):
        assert expected in message


# --------------------------------------------------------------------------------------------
# variational (locked)


@pytest.mark.parametrize("batch_first", [True, False])
def test_variational_mask_shared_over_time(batch_first: bool) -> None:
    torch.manual_seed(6)
    p, n, t, h = 0.4, 256, 10, 64
    shape = (n, t, h) if batch_first else (t, n, h)
    time_axis = 1 if batch_first else 0
    x = positive(shape)
    y = LockedDropout(p, batch_first=batch_first)(x)
    mask = y / x  # 0 or 1/(1-p)
    first = mask.select(time_axis, 0).unsqueeze(time_axis)
    assert torch.equal((mask == 0), (first == 0).expand_as(mask)), "mask changes over time"
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    units = first.squeeze(time_axis)  # [N, H]: one Bernoulli per (sequence, feature)
    # differs across batch elements and across features
    assert not torch.equal(units, units[:1].expand_as(units))
    assert not torch.equal(units, units[:, :1].expand_as(units))
    # σ = sqrt(p(1-p)/n) with n = N·H mask units (not N·T·H elements)
    assert_fraction(int((units == 0).sum()), n * h, p, "dropped unit fraction")


def test_variational_batch_first_flag_picks_the_shared_axis() -> None:
    # (N, T, H) read as (T, N, H) gives a mask shared over axis 0 instead of axis 1.
    torch.manual_seed(7)
    x = torch.ones(32, 10, 16)
    y = LockedDropout(0.5, batch_first=False)(x)
    assert torch.equal(y, y[:1].expand_as(y))
    assert not torch.equal(y, y[:, :1].expand_as(y))


@pytest.mark.parametrize("batch_first", [True, False])
def test_variational_rejects_2d_input(batch_first: bool) -> None:
    with pytest.raises(InputShapeError) as err:
        LockedDropout(0.5, batch_first=batch_first)(torch.ones(5, 4))
    layout = "(N, T, H)" if batch_first else "(T, N, H)"
    assert layout in str(err.value)
    assert "(5, 4)" in str(err.value)


# --------------------------------------------------------------------------------------------
# gaussian


def test_gaussian_moments_and_no_zeros() -> None:
    torch.manual_seed(8)
    x, p, n = 2.0, 0.3, 1_000_000
    s2 = p / (1 - p)
    y = GaussianDropout(p)(torch.full((n,), x))
    assert not (y == 0).any()
    mean, var = float(y.double().mean()), float(y.double().var())
    # y = x(1 + sZ): σ_mean = |x|·s/sqrt(n)
    sigma_mean = abs(x) * math.sqrt(s2) / math.sqrt(n)
    assert abs(mean - x) < 5 * sigma_mean
    # Var[y] = x²s² = x²p/(1-p); normal: μ4 = 3σ⁴, σ of the sample variance = sqrt(2/n)·Var[y]
    expected_var = x**2 * s2
    sigma_var = math.sqrt(2 / n) * expected_var
    assert abs(var - expected_var) < 5 * sigma_var, (var, expected_var)


def test_gaussian_noise_is_multiplicative() -> None:
    torch.manual_seed(9)
    x = torch.tensor([[0.0, 1.0, -4.0]]).repeat(100_000, 1)
    y = GaussianDropout(0.5)(x)
    assert torch.equal(y[:, 0], torch.zeros(100_000))  # 0 · noise
    ratio = y[:, 1:] / x[:, 1:]
    # p = 0.5: noise ~ N(1, 1); per column σ_mean = 1/sqrt(n)
    assert ((ratio.mean(0) - 1).abs() < 5 / math.sqrt(100_000)).all()


def test_gaussian_eval_identity() -> None:
    x = torch.randn(8, 8)
    assert GaussianDropout(0.5).eval()(x) is x


# --------------------------------------------------------------------------------------------
# alpha


def test_alpha_dropped_value_formula_matches_reference() -> None:
    # Reference sheet §1.3 (measured against torch): p=0.05/0.1/0.2 → -1.59478/-1.45774/-1.23616
    for p, value in [(0.05, -1.59478), (0.1, -1.45774), (0.2, -1.23616)]:
        assert abs(alpha_dropped_value(p) - value) < 1e-5


def check_alpha_output(y: Tensor, p: float) -> None:
    """Moments, dropped value and its frequency for the output of alpha dropout on N(0,1)."""
    n = y.numel()
    yd = y.double()
    mean, std = float(yd.mean()), float(yd.std())
    # output variance is 1: σ_mean = 1/sqrt(n)
    assert abs(mean) < 5 / math.sqrt(n), mean
    # σ of the sample std ≈ sqrt((μ4 - 1)/(4n)), μ4 the output's fourth central moment
    mu4 = float(((yd - mean) ** 4).mean())
    sigma_std = math.sqrt((mu4 - 1) / (4 * n))
    assert abs(std - 1) < 5 * sigma_std, (std, sigma_std)
    assert abs(mean) < 0.005 and abs(std - 1) < 0.005  # reference §1.14 bound
    value, count = most_frequent(y)
    assert abs(value - alpha_dropped_value(p)) < 1e-5, value
    # σ = sqrt(p(1-p)/n)
    assert_fraction(count, n, p, "dropped-value frequency")


def test_alpha_keeps_standard_normal_moments_on_float_and_population_paths() -> None:
    torch.manual_seed(10)
    p = 0.1
    layer = AlphaDropout(p)
    y_float = layer(torch.randn(4_000_000))
    check_alpha_output(y_float, p)
    # a population whose rates all equal p: same moments and the same dropped value
    layer.set_rate(torch.full((2,), p))
    y_pop = layer(torch.randn(2, 2_000_000))
    check_alpha_output(y_pop, p)
    assert abs(most_frequent(y_float)[0] - most_frequent(y_pop)[0]) < 1e-5


def test_alpha_channel_float_and_population_paths_agree() -> None:
    torch.manual_seed(11)
    p = 0.1
    layer = AlphaDropout(p, channel=True)
    y_float = layer(torch.randn(25_000, 40, 2))  # (N, C, L)
    layer.set_rate(torch.full((2,), p))
    y_pop = layer(torch.randn(2, 12_500, 40, 2))  # (P, N, C, L)
    v_float, _ = most_frequent(y_float)
    v_pop, _ = most_frequent(y_pop)
    assert abs(v_float - alpha_dropped_value(p)) < 1e-5
    assert abs(v_float - v_pop) < 1e-5
    for y, value in ((y_float, v_float), (y_pop, v_pop)):
        rows = y.reshape(-1, y.shape[-1])
        constant = (rows == value).all(-1)
        # σ = sqrt(p(1-p)/n), n = N·C channels
        assert_fraction(int(constant.sum()), rows.shape[0], p, "constant channels")
        # channels are the independent units and each has variance 1 in mean:
        # σ_mean ≤ 1/sqrt(n_channels)
        assert abs(float(y.double().mean())) < 5 / math.sqrt(rows.shape[0])


def test_alpha_channel_makes_whole_channels_constant() -> None:
    torch.manual_seed(12)
    p = 0.3
    x = torch.randn(200, 100, 3, 3)
    y = AlphaDropout(p, channel=True)(x)
    rows = y.reshape(200 * 100, -1)
    dropped_value, _ = most_frequent(y)
    assert abs(dropped_value - alpha_dropped_value(p)) < 1e-5
    hits = rows == dropped_value
    constant = hits.all(-1)
    assert torch.equal(hits.any(-1), constant), "a channel is partly at the dropped value"
    # kept channels are the affine map a·x + b of the input
    a = ((1 - p) * (1 + p * ALPHA_PRIME**2)) ** -0.5
    b = -a * ALPHA_PRIME * p
    xs = x.reshape(200 * 100, -1)
    torch.testing.assert_close(rows[~constant], a * xs[~constant] + b)
    # σ = sqrt(p(1-p)/n), n = N·C channels
    assert_fraction(int(constant.sum()), rows.shape[0], p, "dropped channels")


def test_alpha_element_mode_does_not_drop_whole_channels() -> None:
    torch.manual_seed(13)
    y = AlphaDropout(0.5)(torch.randn(100, 50, 4))
    rows = y.reshape(-1, 4)
    assert not torch.equal(rows, rows[:, :1].expand_as(rows))


# --------------------------------------------------------------------------------------------
# dropblock


def dropped_map(y: Tensor) -> Tensor:
    return (y == 0).to(torch.float32)


@pytest.mark.parametrize("block_size", [3, 4, 5])
def test_dropblock_2d_zeros_form_blocks_shared_across_channels(block_size: int) -> None:
    torch.manual_seed(14)
    x = positive((32, 3, 20, 20))
    y = DropBlock(0.2, block_size=block_size)(x)
    assert y.shape == x.shape
    z = dropped_map(y)
    assert z.sum() > 0
    assert torch.equal(z, z[:, :1].expand_as(z)), "couple_channels: masks differ across channels"
    assert is_union_of_blocks(z[:, 0], block_size)
    # every kept value carries the same scale numel / kept (batch-global normalisation)
    kept = y != 0
    scale = x.numel() / int(kept.sum())
    torch.testing.assert_close(y[kept], x[kept] * scale)


def test_block_check_rejects_isolated_drops() -> None:
    # the block check above can fail: element-wise dropout is not a union of 3×3 squares
    torch.manual_seed(15)
    z = dropped_map(Dropout(0.2)(torch.ones(8, 20, 20)))
    assert not is_union_of_blocks(z, 3)
    square = torch.zeros(1, 10, 10)
    square[0, 2:5, 6:9] = 1
    square[0, 8:, :2] = 1  # a window clipped at the border
    assert is_union_of_blocks(square, 3)
    square[0, 4, 4] = 1
    assert not is_union_of_blocks(square, 3)


@pytest.mark.parametrize("block_size", [4, 7])
def test_dropblock_1d(block_size: int) -> None:
    torch.manual_seed(16)
    x = positive((64, 4, 100))
    y = DropBlock(0.2, block_size=block_size)(x)
    assert y.shape == x.shape
    z = dropped_map(y)
    assert z.sum() > 0
    assert torch.equal(z, z[:, :1].expand_as(z))
    assert is_union_of_blocks(z[:, 0], block_size)


def test_dropblock_3d() -> None:
    torch.manual_seed(30)
    x = positive((8, 2, 8, 8, 8))
    y = DropBlock(0.2, block_size=3)(x)
    assert y.shape == x.shape
    z = dropped_map(y)
    assert z.sum() > 0
    assert torch.equal(z, z[:, :1].expand_as(z))
    assert is_union_of_blocks(z[:, 0], 3)
    assert not is_union_of_blocks(dropped_map(Dropout(0.2)(x))[:, 0], 3)


def test_dropblock_uncoupled_channels_have_their_own_masks() -> None:
    torch.manual_seed(17)
    x = positive((16, 4, 20, 20))
    y = DropBlock(0.2, block_size=3, couple_channels=False)(x)
    z = dropped_map(y)
    assert not torch.equal(z, z[:, :1].expand_as(z))
    assert is_union_of_blocks(z.reshape(-1, 20, 20), 3)


def test_dropblock_block_larger_than_map_is_clamped() -> None:
    torch.manual_seed(18)
    x = positive((64, 2, 4, 6))
    y = DropBlock(0.3, block_size=5)(x)  # clamped to 4×5
    assert y.shape == x.shape
    z = dropped_map(y)[:, 0]
    assert z.sum() > 0
    assert is_union_of_blocks(z, 5)


def test_dropblock_dropped_fraction_matches_its_gamma() -> None:
    torch.manual_seed(19)
    p, k, n = 0.2, 5, 400
    x = positive((n, 2, 24, 24))
    y = DropBlock(p, block_size=k)(x)
    per_sample = dropped_map(y)[:, 0].mean(dim=(1, 2)).double()  # N i.i.d. samples
    expected = dropblock_expected_fraction(p, k, (24, 24))
    assert 0.5 * p < expected < 1.5 * p  # the scheme targets about p
    # σ = std(per-sample fraction)/sqrt(N) (samples are independent)
    sigma = float(per_sample.std()) / math.sqrt(n)
    assert abs(float(per_sample.mean()) - expected) < 5 * sigma, (per_sample.mean(), expected)


def test_dropblock_preserves_the_mean() -> None:
    torch.manual_seed(20)
    x = torch.rand(64, 8, 16, 16) + 0.5  # U(0.5, 1.5): μ = 1, σ_x = 1/sqrt(12)
    y = DropBlock(0.3, block_size=3)(x)
    kept = int((y != 0).sum())
    assert kept < x.numel()
    # mean(y) = Σ_kept x / n_kept (normalised by numel/kept); given the mask, the average of
    # n_kept i.i.d. draws of x: σ = σ_x/sqrt(n_kept)
    sigma = (1 / math.sqrt(12)) / math.sqrt(kept)
    assert abs(float(y.double().mean()) - 1.0) < 5 * sigma


def test_dropblock_eval_identity() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert DropBlock(0.5).eval()(x) is x


@pytest.mark.parametrize("block_size", [0, -1, 2.0, True])
def test_dropblock_rejects_bad_block_size(block_size: object) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        DropBlock(0.1, block_size=block_size)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_size"):
        make_dropout("dropblock", 0.1, block_size=block_size)


def test_dropblock_rejects_2d_input() -> None:
    with pytest.raises(InputShapeError, match=r"\(N, C, H, W\)"):
        DropBlock(0.1)(torch.ones(4, 5))


# --------------------------------------------------------------------------------------------
# droppath


def test_droppath_drops_whole_samples() -> None:
    torch.manual_seed(21)
    p, n = 0.25, 100_000
    x = positive((n, 3, 4))
    y = DropPath(p)(x)
    ys, xs = y.reshape(n, -1), x.reshape(n, -1)
    dropped = (ys == 0).all(-1)
    kept = close(ys, xs / (1 - p)).all(-1)
    assert (dropped | kept).all()
    # σ = sqrt(p(1-p)/n), n = samples
    assert_fraction(int(dropped.sum()), n, p, "dropped samples")


def test_droppath_is_unbiased_over_draws() -> None:
    torch.manual_seed(22)
    p, draws = 0.3, 100_000
    x0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    y = DropPath(p)(x0.expand(draws, 4))  # each row is an independent draw for the same x0
    # per feature: σ_mean = |x0|·sqrt(p/(1-p))/sqrt(draws)
    sigma = x0.abs() * math.sqrt(p / (1 - p)) / math.sqrt(draws)
    assert ((y.mean(0) - x0).abs() < 5 * sigma).all(), (y.mean(0), x0)


def test_droppath_eval_identity() -> None:
    x = torch.randn(4, 5)
    assert DropPath(0.5).eval()(x) is x


# --------------------------------------------------------------------------------------------
# embedding


def test_embedding_dropout_drops_whole_rows_of_a_matrix() -> None:
    torch.manual_seed(23)
    p, v, d = 0.2, 50_000, 8
    w = torch.randn(v, d)
    y = EmbeddingDropout(p)(w)
    dropped = (y == 0).all(-1)
    kept = close(y, w / (1 - p)).all(-1)
    assert (dropped | kept).all()
    # σ = sqrt(p(1-p)/V), n = rows (word types)
    assert_fraction(int(dropped.sum()), v, p, "dropped rows")


def test_dropout_embedding_drops_word_types() -> None:
    torch.manual_seed(24)
    p, vocab = 0.3, 40
    emb = DropoutEmbedding(vocab, 6, p=p)
    ids = torch.randint(0, vocab, (16, 50))
    out = emb(ids)
    zero = (out == 0).all(-1)
    seen_dropped = seen_kept = 0
    for token in ids.unique().tolist():
        where = ids == token
        vectors = out[where]
        if zero[where].any():
            assert zero[where].all(), f"id {token} dropped at some positions only"
            seen_dropped += 1
        else:
            assert torch.equal(vectors, vectors[:1].expand_as(vectors))
            torch.testing.assert_close(vectors[0], emb.weight[token].detach() / (1 - p))
            seen_kept += 1
    assert seen_dropped > 0 and seen_kept > 0


def test_dropout_embedding_state_dict_matches_nn_embedding() -> None:
    torch.manual_seed(25)
    plain = nn.Embedding(30, 5, padding_idx=0)
    ours = DropoutEmbedding(30, 5, p=0.4, padding_idx=0)
    assert list(ours.state_dict()) == list(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    ours.eval()
    ids = torch.randint(0, 30, (4, 7))
    assert torch.equal(ours(ids), plain(ids))
    back = nn.Embedding(30, 5, padding_idx=0)
    back.load_state_dict(DropoutEmbedding(30, 5, p=0.4).state_dict())


def test_dropout_embedding_from_embedding_shares_the_weight() -> None:
    plain = nn.Embedding(12, 3, padding_idx=1)
    ours = DropoutEmbedding.from_embedding(plain, 0.2)
    assert ours.weight is plain.weight
    assert ours.padding_idx == 1 and ours.row_dropout.p == 0.2
    ids = torch.tensor([[0, 1, 5]])
    assert torch.equal(ours.eval()(ids), plain(ids))


def test_dropout_embedding_from_embedding_keeps_weight_tying() -> None:
    # AWD-LSTM style tying: decoder.weight = embedding.weight must stay one parameter
    plain = nn.Embedding(12, 3)
    decoder = nn.Linear(3, 12, bias=False)
    decoder.weight = plain.weight
    model = nn.ModuleDict({"emb": DropoutEmbedding.from_embedding(plain, 0.2), "dec": decoder})
    assert len(list(model.parameters())) == 1
    model.to(torch.float64)
    with torch.no_grad():
        model["emb"].weight.zero_()
    assert decoder.weight.dtype == torch.float64
    assert torch.equal(decoder.weight, torch.zeros(12, 3, dtype=torch.float64))


def test_dropout_embedding_gradient_reaches_the_weight() -> None:
    torch.manual_seed(26)
    emb = DropoutEmbedding(20, 4, p=0.5)
    ids = torch.arange(20)
    out = emb(ids)
    out.sum().backward()
    assert emb.weight.grad is not None
    kept_rows = ~(out == 0).all(-1)
    expected = kept_rows.to(torch.float32).unsqueeze(-1).expand(20, 4) / 0.5
    torch.testing.assert_close(emb.weight.grad, expected)


# --------------------------------------------------------------------------------------------
# none


def test_none_is_identity_in_train_and_eval() -> None:
    layer = make_dropout("none", 0.7)
    x = torch.randn(3, 4)
    assert layer.training and layer(x) is x
    assert layer.eval()(x) is x
    assert "identity" in repr(layer)


# --------------------------------------------------------------------------------------------
# every kind, through the factory


def test_dropout_kinds_are_the_documented_set() -> None:
    assert set(DROPOUT_KINDS) == set(EXPECTED_KINDS)


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_factory_builds_the_right_class(kind: str) -> None:
    layer = make_dropout(kind, 0.25)
    assert type(layer) is EXPECTED_KINDS[kind]
    assert layer.kind == kind
    assert layer.p == 0.25


def test_factory_forwards_options() -> None:
    layer = make_dropout("dropblock", 0.1, block_size=5, couple_channels=False)
    assert isinstance(layer, DropBlock)
    assert (layer.block_size, layer.couple_channels) == (5, False)
    assert make_dropout("alpha", 0.1, channel=True).channel is True  # type: ignore[union-attr]
    assert make_dropout("variational", 0.1, batch_first=False).batch_first is False  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_every_kind_is_identity_in_eval(kind: str) -> None:
    torch.manual_seed(27)
    layer = make_dropout(kind, 0.5).eval()
    x = positive(SHAPES[kind])
    assert layer(x) is x


@pytest.mark.parametrize("kind", [k for k in DROPOUT_KINDS if k != "none"])
def test_every_kind_changes_its_input_in_training(kind: str) -> None:
    torch.manual_seed(28)
    layer = make_dropout(kind, 0.5)
    x = positive(SHAPES[kind])
    y = layer(x)
    assert y.shape == x.shape
    assert not torch.equal(y, x)


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_every_kind_zero_rate_is_identity(kind: str) -> None:
    x = positive(SHAPES[kind])
    assert torch.equal(make_dropout(kind, 0.0)(x), x)


@pytest.mark.parametrize("kind", [k for k in DROPOUT_KINDS if k != "none"])
def test_repr_shows_the_rate(kind: str) -> None:
    assert "p=0.37" in repr(make_dropout(kind, 0.37))


def test_repr_shows_the_options() -> None:
    assert "block_size=5" in repr(make_dropout("dropblock", 0.1, block_size=5))
    assert "couple_channels=False" in repr(make_dropout("dropblock", 0.1, couple_channels=False))
    assert "batch_first=False" in repr(make_dropout("variational", 0.1, batch_first=False))
    assert "channel=True" in repr(make_dropout("alpha", 0.1, channel=True))


@pytest.mark.parametrize("kind", ["nonsense", "Standard", "", 3])
def test_unknown_kind_lists_the_allowed_ones(kind: object) -> None:
    with pytest.raises(ConfigError) as err:
        make_dropout(kind, 0.1)  # type: ignore[arg-type]
    message = str(err.value)
    assert repr(kind) in message
    for allowed in DROPOUT_KINDS:
        assert allowed in message


BAD_RATES = [
    (-0.1, "-0.1"),
    (1.0, "1.0"),
    (1.5, "1.5"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (True, "True"),
    ("0.5", "'0.5'"),
    (None, "None"),
]


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
@pytest.mark.parametrize(("rate", "shown"), BAD_RATES, ids=[s for _, s in BAD_RATES])
def test_bad_rate_names_kind_and_value(kind: str, rate: object, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_dropout(kind, rate)  # type: ignore[arg-type]
    message = str(err.value)
    assert kind in message
    assert shown in message


@pytest.mark.parametrize("kind", ["standard", "dropblock"])
def test_set_rate_validates_and_keeps_the_old_rate_on_error(kind: str) -> None:
    layer = make_dropout(kind, 0.2)
    with pytest.raises(ConfigError):
        layer.set_rate(1.2)
    assert layer.p == 0.2
    layer.set_rate(0.6)
    assert layer.p == 0.6 and "p=0.6" in repr(layer)


def test_set_rate_changes_the_behaviour() -> None:
    torch.manual_seed(29)
    layer = Dropout(0.1)
    layer.set_rate(0.7)
    x = torch.ones(1000, 1000)
    # σ = sqrt(p(1-p)/n)
    assert_fraction(int((layer(x) == 0).sum()), x.numel(), 0.7, "zero fraction after set_rate")


@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_unknown_option_names_the_allowed_ones(kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_dropout(kind, 0.1, bogus_option=1)
    message = str(err.value)
    assert "bogus_option" in message and kind in message
    allowed = EXPECTED_OPTIONS[kind]
    for option in allowed:
        assert option in message
    if not allowed:
        assert "allowed: none" in message


@settings(max_examples=60, deadline=None)
@given(p=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_any_rate_in_range_is_accepted(p: float) -> None:
    assert make_dropout("standard", p).p == p


@settings(max_examples=60, deadline=None)
@given(p=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0)))
def test_any_rate_out_of_range_is_rejected(p: float) -> None:
    with pytest.raises(ConfigError, match="standard"):
        make_dropout("standard", p)
