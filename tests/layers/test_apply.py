"""``droptune.apply`` on users' own models: sites, kinds, rates, RNN/embedding/weight swaps."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils import parametrize

import droptune
from droptune.exceptions import ConfigError
from droptune.exceptions import InputShapeError
from droptune.layers import AlphaDropout
from droptune.layers import DropBlock
from droptune.layers import DropConnect
from droptune.layers import Dropout
from droptune.layers import DropoutBase
from droptune.layers import DropoutEmbedding
from droptune.layers import GaussianDropout
from droptune.layers import LockedDropout
from droptune.layers import NoDropout
from droptune.layers import SpatialDropout
from droptune.layers import VariationalLSTM


# ------------------------------------------------------------------------------------------
# Users' models


class UserCNN(nn.Module):
    """Conv → ReLU → Dropout2d → Conv → ReLU → Dropout → pool → Flatten → Dropout → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(8, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FunctionalFlattenCNN(nn.Module):
    """Flattens inside forward: registration order cannot see that ``drop_fc`` is dense."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop_conv = nn.Dropout(0.1)
        self.drop_fc = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_conv(torch.relu(self.conv(x)))
        x = x.flatten(1)
        return self.fc(self.drop_fc(x))


class UserMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(0.2)
        self.fc1 = nn.Linear(20, 32)
        self.drop1 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 32)
        self.drop2 = nn.Dropout(0.5)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_in(x)
        x = self.drop1(torch.relu(self.fc1(x)))
        x = self.drop2(torch.relu(self.fc2(x)))
        return self.out(x)


class UserLM(nn.Module):
    """Embedding → 2-layer LSTM(dropout=0.2) → Dropout → Linear."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 24, num_layers=2, batch_first=batch_first, dropout=0.2)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(24, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(self.drop(out))


def transformer() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


CNN_RATES = {"conv_rate": 0.2, "hidden_rate": 0.4}


def _images(n: int = 4, size: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def _train_step(model: nn.Module, x: Any) -> None:
    model.train()
    out = model(x)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _dropout_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd | DropoutBase)
    }


# ------------------------------------------------------------------------------------------
# (a) CNNs


@pytest.mark.parametrize(
    ("kind", "conv_cls"), [("spatial", SpatialDropout), ("dropblock", DropBlock)]
)
def test_cnn_conv_sites_get_the_conv_kind_and_dense_site_gets_standard(
    kind: str, conv_cls: type[DropoutBase]
) -> None:
    model, report = droptune.apply(
        UserCNN(), {"dropout": {"kind": kind, **CNN_RATES, "block_size": 2}}
    )
    net = model.net
    for index in (2, 5):  # after Dropout2d and after the plain nn.Dropout that follows a conv
        assert type(net[index]) is conv_cls
        assert net[index].p == 0.2
    if kind == "dropblock":
        assert net[2].block_size == net[5].block_size == 2
    assert type(net[8]) is Dropout  # after Flatten: a dense site
    assert net[8].p == 0.4
    assert [(c.path, c.site) for c in report] == [
        ("net.2", "conv"),
        ("net.5", "conv"),
        ("net.8", "hidden"),
    ]
    torch.manual_seed(0)
    _train_step(model, _images())
    assert not _dropout_modules(model).keys() - {"net.2", "net.5", "net.8"}
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def test_functional_flatten_without_example_input_falls_back_to_registration_order() -> None:
    # Registration order sees conv → drop_conv → drop_fc → fc: both dropouts follow the conv.
    model, report = droptune.apply(
        FunctionalFlattenCNN(), {"dropout": {"kind": "spatial", **CNN_RATES}}
    )
    assert [(c.path, c.site) for c in report] == [("drop_conv", "conv"), ("drop_fc", "conv")]
    # ... which is why example_input is recommended: channel dropout cannot take (N, F).
    model.train()
    with pytest.raises(InputShapeError, match="spatial dropout expects"):
        model(_images())


def test_functional_flatten_with_example_input_gets_the_hidden_site() -> None:
    model, report = droptune.apply(
        FunctionalFlattenCNN(),
        {"dropout": {"kind": "spatial", **CNN_RATES}},
        example_input=_images(2),
    )
    assert [(c.path, c.site) for c in report] == [("drop_conv", "conv"), ("drop_fc", "hidden")]
    assert type(model.drop_conv) is SpatialDropout and model.drop_conv.p == 0.2
    assert type(model.drop_fc) is Dropout and model.drop_fc.p == 0.4
    _train_step(model, _images())


def test_example_input_as_tuple_of_positional_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.1)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(a + b))

    x = torch.randn(2, 4)
    _, report = droptune.apply(
        TwoInputs(), {"dropout": {"hidden_rate": 0.3}}, example_input=(x, x)
    )
    assert [(c.path, c.site) for c in report] == [("drop", "hidden")]


def test_trace_restores_training_flags() -> None:
    model = UserCNN().train()
    model.net[0].eval()
    droptune.apply(model, {"dropout": CNN_RATES}, example_input=_images(2))
    assert model.training and model.net[3].training and not model.net[0].training


# ------------------------------------------------------------------------------------------
# (b) MLP, every element-wise kind


MLP_RATES = {"input_rate": 0.1, "hidden_rate": 0.3}


@pytest.mark.parametrize(
    ("kind", "cls"),
    [("standard", Dropout), ("gaussian", GaussianDropout), ("alpha", AlphaDropout)],
)
def test_mlp_first_dropout_is_input_site_others_hidden(kind: str, cls: type[DropoutBase]) -> None:
    model, report = droptune.apply(UserMLP(), {"dropout": {"kind": kind, **MLP_RATES}})
    assert type(model.drop_in) is cls and model.drop_in.p == 0.1
    assert type(model.drop1) is cls and model.drop1.p == 0.3
    assert type(model.drop2) is cls and model.drop2.p == 0.3
    assert [(c.path, c.site) for c in report] == [
        ("drop_in", "input"),
        ("drop1", "hidden"),
        ("drop2", "hidden"),
    ]
    if kind == "alpha":
        assert not model.drop_in.channel  # element-wise at dense sites
    _train_step(model, torch.randn(8, 20))


def test_kind_none_turns_every_dropout_into_the_identity() -> None:
    model, report = droptune.apply(UserMLP(), {"dropout": {"kind": "none", **MLP_RATES}})
    for name in ("drop_in", "drop1", "drop2"):
        assert type(getattr(model, name)) is NoDropout
    assert len(report) == 3
    x = torch.randn(8, 20)
    model.train()
    train_out = model(x)
    model.eval()
    assert torch.equal(train_out, model(x))


def test_kind_none_zeroes_attention_and_all_other_rates() -> None:
    rates = {
        "attention_rate": 0.3,
        "hidden_rate": 0.3,
        "weight_rate": 0.3,
        "recurrent_rate": 0.3,
        "embedding_rate": 0.3,
    }
    model, _ = droptune.apply(transformer(), {"dropout": {"kind": "none", **rates}})
    for layer in model.layers:
        assert layer.self_attn.dropout == 0.0
        for name in ("dropout", "dropout1", "dropout2"):
            assert type(getattr(layer, name)) is NoDropout
    assert not any(isinstance(m, DropConnect) for m in model.modules())

    lm, report = droptune.apply(UserLM(), {"dropout": {"kind": "none", **rates}})
    assert type(lm.rnn) is nn.LSTM and lm.rnn.dropout == 0.0  # no variational swap at rate 0
    assert type(lm.emb) is nn.Embedding
    assert type(lm.drop) is NoDropout
    assert "weight" not in {c.site for c in report}


def test_population_kinds_at_dense_sites_fall_back_to_standard() -> None:
    # Channel / sequence kinds have no meaning after a Linear layer: standard dropout is used.
    for kind in ("spatial", "dropblock", "variational"):
        model, _ = droptune.apply(UserMLP(), {"dropout": {"kind": kind, **MLP_RATES}})
        assert type(model.drop1) is Dropout and model.drop1.p == 0.3


# ------------------------------------------------------------------------------------------
# (c) Transformer encoder


TRANSFORMER_RATES = {"attention_rate": 0.15, "hidden_rate": 0.25}


def test_transformer_encoder_attention_and_hidden_rates() -> None:
    model, report = droptune.apply(transformer(), {"dropout": TRANSFORMER_RATES})
    for layer in model.layers:
        assert layer.self_attn.dropout == 0.15
        for name in ("dropout", "dropout1", "dropout2"):
            module = getattr(layer, name)
            assert type(module) is Dropout and module.p == 0.25
    attention = [c for c in report if c.site == "attention"]
    assert [c.path for c in attention] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert attention[0].before == "dropout=0.1" and attention[0].after == "dropout=0.15"
    assert {c.site for c in report if c.path.endswith(("dropout", "dropout1", "dropout2"))} == {
        "hidden"
    }

    x = torch.randn(3, 5, 16)
    torch.manual_seed(0)
    _train_step(model, x)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))  # dropout active in training
        model.eval()
        first = model(x)
        assert torch.equal(first, model(x))
    assert torch.equal(model(x).detach(), model(x).detach())  # eval with grad on, too


def test_transformer_sites_are_the_same_when_traced() -> None:
    plain = droptune.apply(transformer(), {"dropout": TRANSFORMER_RATES})[1]
    traced = droptune.apply(
        transformer(), {"dropout": TRANSFORMER_RATES}, example_input=torch.randn(2, 5, 16)
    )[1]
    assert sorted((c.path, c.site) for c in plain) == sorted((c.path, c.site) for c in traced)


def test_weight_rate_skips_attention_projections() -> None:
    model, report = droptune.apply(transformer(), {"dropout": {"weight_rate": 0.2}})
    for layer in model.layers:
        assert parametrize.is_parametrized(layer.linear1, "weight")
        assert parametrize.is_parametrized(layer.linear2, "weight")
        assert not parametrize.is_parametrized(layer.self_attn.out_proj)
    weight_paths = [c.path for c in report if c.site == "weight"]
    assert weight_paths == [
        "layers.0.linear1",
        "layers.0.linear2",
        "layers.1.linear1",
        "layers.1.linear2",
    ]
    _train_step(model, torch.randn(2, 5, 16))


# ------------------------------------------------------------------------------------------
# (d) LSTM language model


def _tokens(batch: int = 3, steps: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (batch, steps), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_variational_kind_locks_the_dropout_after_the_lstm(batch_first: bool) -> None:
    model, report = droptune.apply(
        UserLM(batch_first), {"dropout": {"kind": "variational", "hidden_rate": 0.3}}
    )
    assert type(model.drop) is LockedDropout
    assert model.drop.p == 0.3 and model.drop.batch_first is batch_first
    assert ("drop", "sequence") in [(c.path, c.site) for c in report]
    # Without a recurrent rate the LSTM stays a plain nn.LSTM; its between-layer dropout is a
    # hidden-rate site.
    assert type(model.rnn) is nn.LSTM and model.rnn.dropout == 0.3
    tokens = _tokens() if batch_first else _tokens().T
    _train_step(model, tokens)


def test_recurrent_rate_swaps_in_a_variational_lstm_with_the_same_parameters() -> None:
    torch.manual_seed(0)
    model = UserLM().eval()
    before = {k: v.clone() for k, v in model.rnn.state_dict().items()}
    expected = model(_tokens())
    model, report = droptune.apply(
        model, {"dropout": {"kind": "variational", "hidden_rate": 0.3, "recurrent_rate": 0.25}}
    )
    rnn = model.rnn
    assert type(rnn) is VariationalLSTM
    assert rnn.recurrent_dropout == 0.25 and rnn.input_dropout == 0.3
    assert (rnn.num_layers, rnn.batch_first, rnn.hidden_size) == (2, True, 24)
    assert not rnn.training  # keeps the eval flag of the module it replaces
    after = rnn.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(model(_tokens()), expected)
    change = next(c for c in report if c.path == "rnn")
    assert change.site == "sequence"
    assert change.before.startswith("LSTM(16, 24")
    assert (
        change.after.startswith("VariationalLSTM(16, 24")
        and "recurrent_dropout=0.25" in change.after
    )
    _train_step(model, _tokens())


def test_recurrent_weight_rate_parametrizes_weight_hh_only() -> None:
    model, report = droptune.apply(UserLM(), {"dropout": {"recurrent_weight_rate": 0.4}})
    for name in ("weight_hh_l0", "weight_hh_l1"):
        assert parametrize.is_parametrized(model.rnn, name)
        (drop,) = model.rnn.parametrizations[name]
        assert isinstance(drop, DropConnect) and drop.p == 0.4
    for name in ("weight_ih_l0", "weight_ih_l1"):
        assert not parametrize.is_parametrized(model.rnn, name)
    assert not parametrize.is_parametrized(model.head)  # weight_rate is 0
    assert ("rnn", "recurrent") in [(c.path, c.site) for c in report]
    _train_step(model, _tokens())


def test_recurrent_weight_rate_together_with_variational_lstm() -> None:
    model, _ = droptune.apply(
        UserLM(), {"dropout": {"recurrent_rate": 0.2, "recurrent_weight_rate": 0.4}}
    )
    assert isinstance(model.rnn, VariationalLSTM)
    assert parametrize.is_parametrized(model.rnn, "weight_hh_l1")
    _train_step(model, _tokens())


def test_embedding_rate_swaps_in_a_dropout_embedding_with_the_same_weights() -> None:
    model = UserLM().eval()
    weight = model.emb.weight.detach().clone()
    expected = model(_tokens())
    model, report = droptune.apply(model, {"dropout": {"embedding_rate": 0.1}})
    assert type(model.emb) is DropoutEmbedding
    assert model.emb.row_dropout.p == 0.1
    assert torch.equal(model.emb.weight, weight)
    assert model.emb.state_dict().keys() == {"weight"}
    assert torch.equal(model(_tokens()), expected)
    change = next(c for c in report if c.path == "emb")
    assert change.site == "embedding" and change.before == "Embedding(50, 16)"
    _train_step(model, _tokens())


def test_weight_rate_adds_dropconnect_to_linear_layers() -> None:
    model, report = droptune.apply(UserLM(), {"dropout": {"weight_rate": 0.3}})
    (drop,) = model.head.parametrizations["weight"]
    assert isinstance(drop, DropConnect) and drop.p == 0.3
    change = next(c for c in report if c.path == "head")
    assert (change.site, change.before, change.after) == (
        "weight",
        "weight",
        "DropConnect(p=0.3) on weight",
    )
    _train_step(model, _tokens())


def test_lstm_swap_keeps_float64() -> None:
    model = UserLM().double()
    model, _ = droptune.apply(
        model, {"dropout": {"recurrent_rate": 0.2, "hidden_rate": 0.1, "embedding_rate": 0.1}}
    )
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    _train_step(model, _tokens())
    model.eval()
    assert model(_tokens()).dtype == torch.float64


# ------------------------------------------------------------------------------------------
# (e) LightningModule


class LitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = UserMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_apply_on_a_lightning_module_and_fit() -> None:
    module = LitClassifier()
    result, report = droptune.apply(module, {"dropout": {"kind": "gaussian", **MLP_RATES}})
    assert result is module
    assert report.paths() == ["net.drop_in", "net.drop1", "net.drop2"]
    assert type(module.net.drop1) is GaussianDropout and module.net.drop1.p == 0.3
    data = torch.utils.data.TensorDataset(torch.randn(16, 20), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 2


# ------------------------------------------------------------------------------------------
# (f) report, overrides, errors, idempotency, flags, dtypes


def test_report_contents_and_table() -> None:
    _, report = droptune.apply(UserCNN(), {"dropout": {"kind": "spatial", **CNN_RATES}})
    assert len(report) == 3
    assert report.paths() == ["net.2", "net.5", "net.8"]
    first, second, third = list(report)
    assert first == droptune.layers.Change(
        "net.2", "conv", "Dropout2d(p=0.1, inplace=False)", "SpatialDropout(p=0.2)", "spatial", 0.2
    )
    assert (second.before, second.after) == (
        "Dropout(p=0.1, inplace=False)",
        "SpatialDropout(p=0.2)",
    )
    assert (third.site, third.after) == ("hidden", "Dropout(p=0.4)")
    lines = str(report).splitlines()
    assert lines[0].split() == ["module", "site", "before", "->", "after"]
    assert lines[1] == "net.2  conv       Dropout2d(p=0.1, inplace=False) -> SpatialDropout(p=0.2)"
    assert lines[3] == "net.8  hidden     Dropout(p=0.1, inplace=False) -> Dropout(p=0.4)"


def test_report_of_a_model_without_dropout() -> None:
    model, report = droptune.apply(
        nn.Sequential(nn.Linear(2, 2)), {"dropout": {"hidden_rate": 0.5}}
    )
    assert len(report) == 0 and report.paths() == []
    assert "no changes" in str(report)
    assert not any(isinstance(m, DropoutBase) for m in model.modules())  # never inserts dropout


def test_apply_twice_with_the_same_config_gives_the_same_model() -> None:
    cfg = {
        "dropout": {
            "kind": "variational",
            "hidden_rate": 0.3,
            "recurrent_rate": 0.2,
            "recurrent_weight_rate": 0.1,
            "embedding_rate": 0.05,
            "weight_rate": 0.15,
        }
    }
    once, first = droptune.apply(UserLM(), cfg)
    twice, second = droptune.apply(droptune.apply(UserLM(), cfg)[0], cfg)
    assert repr(twice) == repr(once)
    assert [(c.path, c.site) for c in second] == [(c.path, c.site) for c in first]
    assert [c.after for c in second if c.path != "rnn"] == [
        c.after for c in first if c.path != "rnn"
    ]
    # The second report's "before" is droptune's own module from the first call.
    assert (
        next(c for c in second if c.path == "drop").before
        == "LockedDropout(p=0.3, batch_first=True)"
    )
    _train_step(twice, _tokens())


@pytest.mark.parametrize("model_fn", [UserCNN, UserMLP, UserLM, transformer])
def test_a_second_apply_replaces_everything_with_the_new_config(model_fn: Any) -> None:
    old = {
        "dropout": {
            "kind": "gaussian",
            "input_rate": 0.3,
            "hidden_rate": 0.3,
            "conv_rate": 0.3,
            "attention_rate": 0.3,
            "recurrent_rate": 0.3,
            "recurrent_weight_rate": 0.3,
            "embedding_rate": 0.3,
            "weight_rate": 0.3,
        }
    }
    new = {
        "dropout": {
            "kind": "standard",
            "input_rate": 0.1,
            "hidden_rate": 0.2,
            "conv_rate": 0.05,
            "attention_rate": 0.15,
            "recurrent_rate": 0.25,
        }
    }
    fresh = droptune.apply(model_fn(), new)[0]
    reapplied = droptune.apply(droptune.apply(model_fn(), old)[0], new)[0]
    # Same kinds and rates everywhere. Weights that had DropConnect keep it at rate 0, and a
    # DropoutEmbedding keeps its row dropout at rate 0: the same behaviour as none at all.
    assert _rates(reapplied) == _rates(fresh)


def _rates(model: nn.Module) -> dict[str, Any]:
    """Every dropout setting of a model; DropConnect and row dropout at rate 0 count as absent."""
    out: dict[str, Any] = {}
    for path, m in model.named_modules():
        if isinstance(m, DropConnect):
            if m.p:
                out[path.replace(".parametrizations.", "#").rsplit(".", 1)[0]] = (
                    "dropconnect",
                    m.p,
                )
        elif isinstance(m, DropoutEmbedding):
            out[path] = ("embedding", m.row_dropout.p)
        elif isinstance(m, nn.Embedding):
            out[path] = ("embedding", 0.0)
        elif isinstance(m, DropoutBase) and path.endswith(".row_dropout"):
            continue
        elif isinstance(m, DropoutBase):
            out[path] = (type(m).__name__, m.p)
        elif isinstance(m, nn.MultiheadAttention):
            out[path] = ("mha", m.dropout)
        elif isinstance(m, VariationalLSTM):
            out[path] = ("vlstm", m.input_dropout, m.recurrent_dropout)
        elif isinstance(m, nn.RNNBase):
            out[path] = (type(m).__name__.removeprefix("Parametrized"), m.dropout)
    return out


def test_kind_none_then_a_real_config_restores_every_site() -> None:
    cfg = {"dropout": {"kind": "variational", "hidden_rate": 0.3, "recurrent_rate": 0.2}}
    fresh = droptune.apply(UserLM(), cfg)[0]
    off = droptune.apply(UserLM(), {"dropout": {"kind": "none"}})[0]
    assert off.rnn.dropout == 0.0
    again = droptune.apply(off, cfg)[0]
    assert isinstance(again.rnn, VariationalLSTM) and again.rnn.input_dropout == 0.3
    assert repr(again) == repr(fresh)


def test_sites_override() -> None:
    model, report = droptune.apply(
        UserCNN(), {"dropout": {"kind": "spatial", **CNN_RATES}}, sites={"net.5": "hidden"}
    )
    assert type(model.net[5]) is Dropout and model.net[5].p == 0.4
    assert type(model.net[2]) is SpatialDropout
    assert [(c.path, c.site) for c in report][:2] == [("net.2", "conv"), ("net.5", "hidden")]


def test_bad_site_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"sites\['net.5'\]: must be one of input, hidden, conv"):
        droptune.apply(UserCNN(), {"dropout": CNN_RATES}, sites={"net.5": "dense"})


def test_site_override_for_a_path_that_is_not_a_dropout_module() -> None:
    model = UserCNN()
    with pytest.raises(ConfigError, match=r"sites\['net\.0'\]: not a dropout module") as info:
        droptune.apply(model, {"dropout": CNN_RATES}, sites={"net.0": "hidden"})
    assert "net.2, net.5, net.8" in str(info.value)
    assert type(model.net[2]) is nn.Dropout2d  # nothing was changed


def test_bad_regularization_dict_names_the_dotted_path() -> None:
    model = UserMLP()
    with pytest.raises(ConfigError) as info:
        droptune.apply(model, {"dropout": {"hidden_rate": 1.5}})
    assert str(info.value) == "regularization.dropout.hidden_rate: must be < 1.0, got 1.5"
    assert isinstance(info.value, ValueError)
    assert type(model.drop1) is nn.Dropout  # validated before anything changes
    with pytest.raises(ConfigError, match=r"^regularization\.dropout\.kind: must be one of"):
        droptune.apply(model, {"dropout": {"kind": "zoneout"}})


def test_accepts_a_config_object_and_returns_the_same_model_object() -> None:
    model = UserMLP()
    cfg = droptune.RegularizationConfig.from_dict({"dropout": MLP_RATES})
    result, _ = droptune.apply(model, cfg)
    assert result is model


@pytest.mark.parametrize("training", [True, False])
def test_new_modules_keep_the_training_flag(training: bool) -> None:
    model = UserLM().train(training)
    droptune.apply(
        model,
        {
            "dropout": {
                "kind": "variational",
                "hidden_rate": 0.3,
                "recurrent_rate": 0.2,
                "embedding_rate": 0.1,
            }
        },
    )
    assert {m.training for m in model.modules()} == {training}


def test_mixed_training_flags_are_kept_per_module() -> None:
    model = UserMLP().train()
    model.drop1.eval()
    droptune.apply(model, {"dropout": MLP_RATES})
    assert model.drop_in.training and not model.drop1.training and model.drop2.training


def test_float64_models() -> None:
    cnn, _ = droptune.apply(UserCNN().double(), {"dropout": {"kind": "dropblock", **CNN_RATES}})
    _train_step(cnn, _images().double())
    mlp, _ = droptune.apply(
        UserMLP().double(), {"dropout": {"kind": "alpha", "weight_rate": 0.1, **MLP_RATES}}
    )
    _train_step(mlp, torch.randn(4, 20, dtype=torch.float64))
    assert {p.dtype for p in mlp.parameters()} == {torch.float64}


def test_droptune_modules_in_the_model_are_sites_too() -> None:
    model = nn.Sequential(
        droptune.make_dropout("gaussian", 0.5),
        nn.Linear(4, 4),
        droptune.make_dropout("alpha", 0.1),
    )
    droptune.apply(model, {"dropout": {"kind": "standard", "input_rate": 0.1, "hidden_rate": 0.2}})
    assert type(model[0]) is Dropout and model[0].p == 0.1
    assert type(model[2]) is Dropout and model[2].p == 0.2


def test_parametrized_bidirectional_gru_swaps_with_its_raw_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(6, 8, num_layers=2, bidirectional=True, dropout=0.1)).eval()
    x = torch.randn(5, 3, 6)
    expected = model(x)[0]
    droptune.apply(model, {"dropout": {"recurrent_weight_rate": 0.3}})
    assert parametrize.is_parametrized(model[0], "weight_hh_l1_reverse")
    droptune.apply(model, {"dropout": {"recurrent_rate": 0.2, "recurrent_weight_rate": 0.4}})
    gru = model[0]
    assert isinstance(gru, droptune.layers.VariationalGRU) and gru.bidirectional
    (drop,) = gru.parametrizations["weight_hh_l1_reverse"]
    assert isinstance(drop, DropConnect) and drop.p == 0.4
    assert torch.equal(model(x)[0], expected)  # DropConnect and masks are off in eval
    model.train()
    model(x)[0].square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rnn_with_a_foreign_parametrization_is_not_swapped() -> None:
    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 1.0

    model = nn.Sequential(nn.LSTM(4, 4))
    parametrize.register_parametrization(model[0], "weight_hh_l0", Scale())
    with pytest.raises(ConfigError, match=r"^0: recurrent_rate cannot replace an RNN whose"):
        droptune.apply(model, {"dropout": {"recurrent_rate": 0.2}})


def test_dropout_after_a_leading_flatten_is_the_input_site() -> None:
    # Flatten before any weight layer does not make the next dropout a hidden one.
    net = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(16, 8), nn.Dropout(0.0))
    _, report = droptune.apply(net, {"dropout": {"input_rate": 0.1, "hidden_rate": 0.4}})
    assert [(c.path, c.site) for c in report] == [("1", "input"), ("3", "hidden")]
    assert net[1].p == 0.1 and net[3].p == 0.4


# ------------------------------------------------------------------------------------------
# Models apply cannot fully understand: no crash


def test_a_forward_the_example_cannot_run_falls_back_with_a_warning() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.1)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(a + b))

    model = TwoInputs()
    with pytest.warns(droptune.exceptions.DroptuneWarning, match="TypeError"):
        _, report = droptune.apply(
            model, {"dropout": {"hidden_rate": 0.2}}, example_input=_images()
        )
    assert report.sites() == {"drop": "hidden"} and model.drop.p == 0.2
    assert "registration order" in report.notes[0]
    # No hook is left behind on the model.
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_scripted_children_and_dict_outputs_are_traced() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
            self.drop = nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
            return {"out": [self.drop(self.body(x))]}

    import warnings

    model = DictOut()
    with warnings.catch_warnings():
        warnings.simplefilter("error", droptune.exceptions.DroptuneWarning)
        _, report = droptune.apply(
            model,
            {"dropout": {"input_rate": 0.1, "hidden_rate": 0.2}},
            example_input=torch.ones(2, 4),
        )
    assert report.sites() == {"drop": "hidden"}  # after the scripted Linear


def test_a_model_that_is_itself_a_dropout_module_is_left_alone() -> None:
    model, report = droptune.apply(nn.Dropout(0.1), {"dropout": {"hidden_rate": 0.2}})
    assert len(report) == 0 and model.p == 0.1
