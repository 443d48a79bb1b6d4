"""Population rates: a ``[P]`` rate tensor, inputs with a leading ``[P, N, ...]`` axis.

Member i must behave exactly like a float-rate layer at ``p[i]``: its own drop fraction and
scale, its own structure (channels, time, samples, rows, blocks) and nothing leaking between
members. Statistical checks use ``|estimate - expected| < 5σ`` with σ written next to each one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
import torch.nn.functional as F

from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers import DROPOUT_KINDS
from droptune.layers import AlphaDropout
from droptune.layers import DropBlock
from droptune.layers import Dropout
from droptune.layers import DropoutBase
from droptune.layers import DropPath
from droptune.layers import EmbeddingDropout
from droptune.layers import GaussianDropout
from droptune.layers import LockedDropout
from droptune.layers import SpatialDropout
from droptune.layers import make_dropout
from tests.layers._stats import SHAPES
from tests.layers._stats import assert_fraction
from tests.layers._stats import close


SELU_LAMBDA = 1.0507009873554804934193349852946
SELU_ALPHA = 1.6732632423543772848170429916717
ALPHA_PRIME = -SELU_LAMBDA * SELU_ALPHA

# A per-member input shape [N, ...] (the population axis goes in front).
MEMBER_SHAPES = {k: v for k, v in SHAPES.items() if k != "none"}

POPULATION_KINDS = [k for k in DROPOUT_KINDS if k != "none"]


def assert_same_rate(count_a: int, count_b: int, n: int, p: float, what: str) -> None:
    """Two independent binomial fractions at the same p: σ_diff = sqrt(2p(1-p)/n), bound 5σ."""
    sigma = math.sqrt(2 * p * (1 - p) / n)
    diff = (count_a - count_b) / n
    assert abs(diff) < 5 * sigma, f"{what}: fractions differ by {diff:.5f} (5σ = {5 * sigma:.5f})"


def alpha_dropped_value(p: float) -> float:
    """a·α' + b with a = ((1-p)(1+pα'²))^(-1/2), b = -a·α'·p."""
    a = ((1 - p) * (1 + p * ALPHA_PRIME**2)) ** -0.5
    return a * ALPHA_PRIME - a * ALPHA_PRIME * p


def positive(shape: tuple[int, ...]) -> Tensor:
    return torch.rand(shape) + 0.5  # no zeros: a zero in the output marks a drop


def units_dropped(kind: str, y: Tensor, x: Tensor, p: float) -> tuple[Tensor, int]:
    """For one member's output, a bool tensor of its drop units (True = dropped) after checking
    the structure: each unit is all-0 or all-x/(1-p). Returns (dropped units, number of units)."""
    if kind in ("standard", "embedding", "droppath", "spatial"):
        lead = {"standard": y.dim(), "embedding": y.dim() - 1, "droppath": 1, "spatial": 2}[kind]
        ys = y.reshape(*y.shape[:lead], -1)
        xs = x.reshape(*x.shape[:lead], -1)
    elif kind == "variational":  # member layout (N, T, H): the unit is (n, h), shared over t
        ys, xs = y.transpose(1, 2), x.transpose(1, 2)
    else:
        raise AssertionError(kind)
    dropped = (ys == 0).all(-1)
    kept = close(ys, xs / (1 - p)).all(-1)
    assert (dropped | kept).all(), f"{kind}: a unit is neither all-0 nor all-x/(1-p)"
    return dropped, dropped.numel()


# Per-member input sizes for the fraction tests: 1e4 drop units per member for each kind.
FRACTION_SHAPES = {
    "standard": (100, 100),
    "embedding": (2500, 4, 3),
    "droppath": (10_000, 3),
    "spatial": (100, 100, 2),
    "variational": (200, 5, 50),
}


@pytest.mark.parametrize("kind", list(FRACTION_SHAPES))
def test_each_member_uses_its_own_rate(kind: str) -> None:
    torch.manual_seed(100)
    rates = [0.0, 0.2, 0.5, 0.8]
    x = positive((len(rates), *FRACTION_SHAPES[kind]))
    layer = make_dropout(kind, torch.tensor(rates))
    y = layer(x)
    assert y.shape == x.shape
    assert torch.equal(y[0], x[0])
    for i, p in enumerate(rates):
        dropped, n = units_dropped(kind, y[i], x[i], p)
        if p == 0:
            assert not dropped.any()
        else:
            # σ = sqrt(p(1-p)/n), n = drop units of member i (elements, rows, samples,
            # channels or (sequence, feature) pairs)
            assert_fraction(int(dropped.sum()), n, p, f"{kind} member {i}")


@pytest.mark.parametrize("member_shape", [(50, 40, 3, 4), (50, 40, 2, 2, 3)], ids=["2d", "3d"])
def test_spatial_population_on_2d_and_3d_maps(member_shape: tuple[int, ...]) -> None:
    torch.manual_seed(111)
    rates = [0.0, 0.4]
    x = positive((2, *member_shape))
    y = SpatialDropout(torch.tensor(rates))(x)
    assert torch.equal(y[0], x[0])
    dropped, n = units_dropped("spatial", y[1], x[1], 0.4)
    # σ = sqrt(p(1-p)/n), n = N·C channels of member 1
    assert_fraction(int(dropped.sum()), n, 0.4, "spatial member 1")


@pytest.mark.parametrize("batch_first", [True, False])
def test_variational_population_shares_the_mask_over_time(batch_first: bool) -> None:
    torch.manual_seed(101)
    rates = torch.tensor([0.3, 0.6])
    shape = (2, 64, 7, 16) if batch_first else (2, 7, 64, 16)
    time_axis = 2 if batch_first else 1
    x = positive(shape)
    y = LockedDropout(rates, batch_first=batch_first)(x)
    zero = y == 0
    first = zero.select(time_axis, 0).unsqueeze(time_axis)
    assert torch.equal(zero, first.expand_as(zero))
    for i, p in enumerate(rates.tolist()):
        kept = ~zero[i]
        torch.testing.assert_close(y[i][kept], x[i][kept] / (1 - p))
    # members draw independent masks
    assert not torch.equal(zero[0], zero[1])


def test_dropblock_population() -> None:
    torch.manual_seed(102)
    rates = torch.tensor([0.0, 0.1, 0.3])
    x = positive((3, 64, 2, 16, 16))
    y = DropBlock(rates, block_size=3)(x)
    assert torch.equal(y[0], x[0])
    z = (y == 0).to(torch.float32)
    assert torch.equal(z, z[:, :, :1].expand_as(z))  # coupled channels, per member
    fractions = z[:, :, 0].mean(dim=(1, 2, 3))
    assert fractions[0] == 0 and 0 < fractions[1] < fractions[2]
    # each seed grows into a 3×3 square: dilating the map of seeds-that-fit reproduces it
    dropped = z[1:, :, 0].reshape(-1, 1, 16, 16)
    anchors = -F.max_pool2d(-F.pad(dropped, (2, 2, 2, 2), value=1.0), 3, stride=1)
    opened = F.max_pool2d(F.pad(anchors, (2, 2, 2, 2)), 3, stride=1)[..., 2:18, 2:18]
    assert torch.equal(opened, dropped)
    # per-member normalisation: member i's kept values carry numel_i / kept_i
    for i in (1, 2):
        kept = y[i] != 0
        scale = x[i].numel() / int(kept.sum())
        torch.testing.assert_close(y[i][kept], x[i][kept] * scale)


def test_gaussian_population_variance_per_member() -> None:
    torch.manual_seed(103)
    rates = [0.0, 0.2, 0.5]
    n, x = 300_000, 2.0
    y = GaussianDropout(torch.tensor(rates))(torch.full((3, n), x))
    assert torch.equal(y[0], torch.full((n,), x))
    for i, p in enumerate(rates[1:], start=1):
        assert not (y[i] == 0).any()
        expected_var = x**2 * p / (1 - p)
        # normal noise: σ_mean = sqrt(Var/n), σ of the sample variance = sqrt(2/n)·Var
        assert abs(float(y[i].double().mean()) - x) < 5 * math.sqrt(expected_var / n)
        var = float(y[i].double().var())
        assert abs(var - expected_var) < 5 * math.sqrt(2 / n) * expected_var


@pytest.mark.parametrize("channel", [False, True])
def test_alpha_population_dropped_value_per_member(channel: bool) -> None:
    torch.manual_seed(104)
    rates = [0.0, 0.05, 0.1, 0.2]
    shape = (4, 2000, 50, 2) if channel else (4, 200_000)
    x = torch.randn(shape)
    y = AlphaDropout(torch.tensor(rates), channel=channel)(x)
    assert torch.equal(y[0], x[0])
    for i, p in enumerate(rates[1:], start=1):
        expected = alpha_dropped_value(p)
        values, counts = y[i].flatten().unique(return_counts=True)
        value = float(values[counts.argmax()])
        assert abs(value - expected) < 1e-5, (p, value, expected)
        hits = y[i] == values[counts.argmax()]
        if channel:
            rows = hits.reshape(-1, 2)
            assert torch.equal(rows.any(-1), rows.all(-1)), "channel partly dropped"
            # σ = sqrt(p(1-p)/n), n = N·C channels
            assert_fraction(int(rows.all(-1).sum()), rows.shape[0], p, f"alpha member {i}")
        else:
            assert_fraction(int(hits.sum()), hits.numel(), p, f"alpha member {i}")
        # kept units: a·x + b with member i's own a, b
        a = ((1 - p) * (1 + p * ALPHA_PRIME**2)) ** -0.5
        b = -a * ALPHA_PRIME * p
        torch.testing.assert_close(y[i][~hits], a * x[i][~hits] + b)


@pytest.mark.parametrize("kind", POPULATION_KINDS)
def test_zero_rate_member_is_untouched(kind: str) -> None:
    torch.manual_seed(105)
    x = positive((2, *MEMBER_SHAPES[kind]))
    layer = make_dropout(kind, torch.tensor([0.0, 0.5]))
    y = layer(x)
    assert torch.equal(y[0], x[0])
    assert not torch.equal(y[1], x[1])


@pytest.mark.parametrize("kind", POPULATION_KINDS)
def test_population_eval_identity(kind: str) -> None:
    x = positive((2, *MEMBER_SHAPES[kind]))
    layer = make_dropout(kind, torch.tensor([0.3, 0.5])).eval()
    assert layer(x) is x


# Equal-rate populations against the float rate: (member input shape, kind) and the statistic.
EQUAL_SHAPES = {
    "standard": (100, 100),
    "embedding": (2500, 4, 3),
    "droppath": (10_000, 3),
    "spatial": (100, 100, 2),
    "variational": (200, 5, 50),
}


@pytest.mark.parametrize("kind", list(EQUAL_SHAPES))
def test_equal_rates_behave_like_the_float_rate(kind: str) -> None:
    torch.manual_seed(106)
    p, members = 0.3, 2
    shape = EQUAL_SHAPES[kind]
    x_float = positive((members * shape[0], *shape[1:]))
    x_pop = x_float.reshape(members, *shape)
    y_float = make_dropout(kind, p)(x_float).reshape(members, *shape)
    y_pop = make_dropout(kind, torch.full((members,), p))(x_pop)
    counts = []
    n = 0
    for y in (y_float, y_pop):
        count, n = 0, 0
        for i in range(members):
            dropped, units = units_dropped(kind, y[i], x_pop[i], p)
            count, n = count + int(dropped.sum()), n + units
        # σ = sqrt(p(1-p)/n), n = drop units over all members
        assert_fraction(count, n, p, kind)
        counts.append(count)
    # σ_diff = sqrt(2p(1-p)/n)
    assert_same_rate(counts[0], counts[1], n, p, kind)


def test_equal_rates_gaussian_alpha_dropblock_match_the_float_rate() -> None:
    torch.manual_seed(107)
    p = 0.2
    # gaussian: same variance x²p/(1-p); σ of the sample variance = sqrt(2/n)·Var per run
    n = 400_000
    g_float = GaussianDropout(p)(torch.ones(n))
    g_pop = GaussianDropout(torch.full((2,), p))(torch.ones(2, n // 2))
    expected_var = p / (1 - p)
    for y in (g_float, g_pop):
        assert abs(float(y.double().var()) - expected_var) < 5 * math.sqrt(2 / n) * expected_var
    # alpha: same dropped value, moments of N(0,1) kept; σ_mean = 1/sqrt(n)
    a_float = AlphaDropout(p)(torch.randn(n))
    a_pop = AlphaDropout(torch.full((2,), p))(torch.randn(2, n // 2))
    modes = []
    for y in (a_float, a_pop):
        values, counts = y.flatten().unique(return_counts=True)
        modes.append(float(values[counts.argmax()]))
        assert abs(float(y.double().mean())) < 5 / math.sqrt(n)
    assert abs(modes[0] - modes[1]) < 1e-5
    assert abs(modes[0] - alpha_dropped_value(p)) < 1e-5
    # dropblock: same dropped fraction; per-sample fractions are i.i.d.,
    # σ_diff = sqrt(var_a/N_a + var_b/N_b) from the sample variances
    x = positive((256, 1, 16, 16))
    d_float = (DropBlock(p, block_size=3)(x) == 0).double().mean(dim=(1, 2, 3))
    d_pop = DropBlock(torch.full((2,), p), block_size=3)(x.reshape(2, 128, 1, 16, 16)) == 0
    d_pop_frac = d_pop.double().mean(dim=(2, 3, 4)).flatten()
    sigma = math.sqrt(float(d_float.var()) / 256 + float(d_pop_frac.var()) / 256)
    assert abs(float(d_float.mean()) - float(d_pop_frac.mean())) < 5 * sigma


@pytest.mark.parametrize("kind", ["standard", "droppath"])
def test_population_gradient_is_the_scaled_mask(kind: str) -> None:
    torch.manual_seed(108)
    rates = torch.tensor([0.0, 0.25, 0.5])
    x = positive((3, 50, 8)).requires_grad_()
    y = make_dropout(kind, rates)(x)
    y.sum().backward()
    assert x.grad is not None
    expected = (y != 0).to(x.dtype) / (1 - rates).view(3, 1, 1)
    torch.testing.assert_close(x.grad, expected)


# --------------------------------------------------------------------------------------------
# the rate buffer


@pytest.mark.parametrize("kind", POPULATION_KINDS)
def test_rate_buffer_moves_with_the_module_and_stays_out_of_state_dict(kind: str) -> None:
    layer = make_dropout(kind, torch.tensor([0.1, 0.2, 0.3]))
    assert layer.population == 3
    assert "population of 3: 0.1, 0.2, 0.3" in repr(layer)
    assert "p" in dict(layer.named_buffers())
    assert "p" not in layer.state_dict()
    # a population checkpoint loads into a float-rate layer and vice versa
    make_dropout(kind, 0.4).load_state_dict(layer.state_dict())
    layer.load_state_dict(make_dropout(kind, 0.4).state_dict())
    layer.to(torch.float64)
    assert isinstance(layer.p, Tensor) and layer.p.dtype == torch.float64
    torch.testing.assert_close(layer.p, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    layer.to("meta")
    assert layer.p.device.type == "meta"


def test_float64_population_forward() -> None:
    torch.manual_seed(109)
    layer = Dropout(torch.tensor([0.0, 0.5])).to(torch.float64)
    x = positive((2, 100, 100)).double()
    y = layer(x)
    assert y.dtype == torch.float64
    assert torch.equal(y[0], x[0])
    kept = y[1] != 0
    torch.testing.assert_close(y[1][kept], x[1][kept] * 2)


def test_set_rate_keeps_the_buffer_device() -> None:
    layer = Dropout(torch.tensor([0.1, 0.2])).to("meta")
    layer.set_rate(torch.tensor([0.3, 0.4, 0.5]))
    assert isinstance(layer.p, Tensor) and layer.p.device.type == "meta"
    assert layer.population == 3


def test_rate_tensor_is_copied_and_detached() -> None:
    rates = torch.tensor([0.1, 0.2], requires_grad=True)
    layer = Dropout(rates)
    assert isinstance(layer.p, Tensor)
    assert not layer.p.requires_grad
    with torch.no_grad():
        rates[0] = 0.9
    assert float(layer.p[0]) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kind", POPULATION_KINDS)
def test_wrong_population_axis_raises(kind: str) -> None:
    layer = make_dropout(kind, torch.tensor([0.1, 0.2, 0.3]))
    x = positive((2, *MEMBER_SHAPES[kind]))  # 2 members, rates for 3
    with pytest.raises(InputShapeError) as err:
        layer(x)
    message = str(err.value)
    assert kind in message
    assert "3" in message and str(tuple(x.shape)) in message


@pytest.mark.parametrize("kind", ["spatial", "dropblock"])
def test_population_spatial_rank_error_mentions_the_population_axis(kind: str) -> None:
    layer = make_dropout(kind, torch.tensor([0.1, 0.2]))
    with pytest.raises(InputShapeError, match="population"):
        layer(torch.ones(2, 4, 3))  # [P, N, C]: no spatial axis


@pytest.mark.parametrize("batch_first", [True, False])
def test_population_variational_needs_four_axes(batch_first: bool) -> None:
    layer = LockedDropout(torch.tensor([0.1, 0.2]), batch_first=batch_first)
    with pytest.raises(InputShapeError, match="population"):
        layer(torch.ones(2, 5, 4))


BAD_RATE_TENSORS = [
    (torch.full((2, 2), 0.1), "(2, 2)"),
    (torch.tensor(0.1), "()"),
    (torch.tensor([]), "(0,)"),
    (torch.tensor([0.1, 1.0]), "1.0"),
    (torch.tensor([-0.2, 0.1]), "-0.2"),
    (torch.tensor([0.1, float("nan")]), "nan"),
]

BAD_TENSOR_IDS = [shown for _, shown in BAD_RATE_TENSORS]


@pytest.mark.parametrize("kind", POPULATION_KINDS)
@pytest.mark.parametrize(("rates", "shown"), BAD_RATE_TENSORS, ids=BAD_TENSOR_IDS)
def test_bad_rate_tensor_raises_config_error(kind: str, rates: Tensor, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_dropout(kind, rates)
    assert kind in str(err.value)
    assert shown in str(err.value)


def test_set_rate_switches_between_float_and_tensor() -> None:
    torch.manual_seed(110)
    layer: DropoutBase = SpatialDropout(0.3)
    x_single = positive((8, 4, 5))
    x_pop = positive((2, 8, 4, 5))
    assert layer.population is None and layer(x_single).shape == x_single.shape

    layer.set_rate(torch.tensor([0.0, 0.5]))
    assert layer.population == 2
    assert "p" in dict(layer.named_buffers()) and not layer.state_dict()
    assert "population of 2" in repr(layer)
    y = layer(x_pop)
    assert torch.equal(y[0], x_pop[0])
    with pytest.raises(InputShapeError):
        layer(x_single)  # 8 != 2 along the population axis

    layer.set_rate(0.5)
    assert layer.population is None and layer.p == 0.5
    assert "p" not in dict(layer.named_buffers())
    assert "p=0.5" in repr(layer)
    assert layer(x_single).shape == x_single.shape

    layer.set_rate(torch.tensor([0.1, 0.2, 0.3]))
    assert layer.population == 3
    layer.set_rate(0.0)
    assert layer(x_single) is x_single


@pytest.mark.parametrize(
    "cls",
    [Dropout, GaussianDropout, AlphaDropout, DropPath, EmbeddingDropout, SpatialDropout],
)
def test_population_rate_tensor_with_all_zeros_is_identity(cls: type[DropoutBase]) -> None:
    x = positive((2, 4, 3, 5))
    torch.testing.assert_close(cls(torch.zeros(2))(x), x, rtol=0, atol=0)
