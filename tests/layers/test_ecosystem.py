"""``droptune.apply`` on models as the ecosystem builds them: Hugging Face ``transformers``
models built from small configs (no download), and models written like timm / torchvision
(which cannot be imported next to the CPU torch here, so the test defines look-alikes)."""

from __future__ import annotations

from collections.abc import Callable
import io
import os
import re
from typing import Any
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import droptune
from droptune.exceptions import ConfigError
from droptune.exceptions import DroptuneWarning
from droptune.layers import DropoutBase


os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

RATES = {
    "input_rate": 0.05,
    "hidden_rate": 0.2,
    "attention_rate": 0.15,
    "droppath_rate": 0.3,
}
SITE_RATE = {"input": 0.05, "hidden": 0.2, "attention": 0.15}


# ------------------------------------------------------------------------------------------
# The models: (builder, example input, [(path pattern, expected site)])


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return transformers.ViTForImageClassification(config)


def convnext() -> nn.Module:
    config = transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=0.1, num_labels=3
    )
    return transformers.ConvNextForImageClassification(config)


def t5() -> nn.Module:
    config = transformers.T5Config(
        d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=2, vocab_size=100,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _tokens(seed: int = 0, batch: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], list[tuple[str, str]]]] = {
    "bert": (
        bert,
        _tokens,
        [
            (r"embeddings\.dropout$", "input"),
            (r"attention\.self\.dropout$", "attention"),
            (r"attention\.output\.dropout$", "hidden"),
            (r"layer\.\d+\.output\.dropout$", "hidden"),
            (r"^dropout$", "hidden"),  # the classifier head's
        ],
    ),
    "gpt2": (
        gpt2,
        _tokens,
        [
            (r"^transformer\.drop$", "input"),
            (r"attn\.attn_dropout$", "attention"),
            (r"attn\.resid_dropout$", "hidden"),
            (r"mlp\.dropout$", "hidden"),
        ],
    ),
    "vit": (
        vit,
        lambda: _images(16),
        [
            (r"embeddings\.dropout$", "input"),
            (
                r"attention\.(attention\.)?(attention_dropout|attention_probs_dropout_prob)$",
                "attention",
            ),
            (r"attention\.attention\.dropout$", "attention"),
            (r"(layers?\.\d+|output)\.dropout$", "hidden"),
        ],
    ),
    "convnext": (convnext, lambda: _images(32), [(r"drop_path$", "residual")]),
    "t5": (
        t5,
        lambda: {"input_ids": _tokens(), "decoder_input_ids": _tokens(1, length=5)},
        [
            (r"^(encoder|decoder)\.dropout$", "input"),
            (r"(SelfAttention|EncDecAttention)\.dropout$", "attention"),
            (r"DenseReluDense\.dropout$", "hidden"),
            (r"layer\.\d+\.dropout$", "hidden"),
        ],
    ),
}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]()


def _logits(model: nn.Module, example: Any) -> torch.Tensor:
    out = droptune.layers._trace.call_model(model, example)
    return out.logits if hasattr(out, "logits") else out


def _expected(name: str, path: str) -> str:
    hits = [site for pattern, site in MODELS[name][2] if re.search(pattern, path)]
    assert len(hits) == 1, f"{name}: {path!r} matches {hits} of the expected patterns"
    return hits[0]


def _dropout_paths(model: nn.Module) -> set[str]:
    return {
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd | DropoutBase)
    }


def _value(model: nn.Module, change: droptune.layers.Change) -> float:
    """The rate now in effect at a reported site, read from the model itself."""
    if "(" in change.after:  # a module: "Dropout(p=0.2)"
        return float(model.get_submodule(change.path).p)
    attribute = change.after.partition("=")[0]  # "drop_prob=0.1", "attention_dropout=0.15"
    owner = change.path
    if owner == attribute or owner.endswith(f".{attribute}"):  # a float attribute site
        owner = owner[: -len(attribute)].rstrip(".")
    return float(getattr(model.get_submodule(owner), attribute))


# ------------------------------------------------------------------------------------------
# Hugging Face models


@pytest.mark.parametrize("name", list(MODELS))
def test_every_dropout_site_is_found_with_its_site_and_rate(name: str) -> None:
    model = _build(name)
    dropout_modules = _dropout_paths(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroptuneWarning)  # the trace must not fall back
        _, report = droptune.apply(model, {"dropout": RATES}, example_input=MODELS[name][1]())
    sites = report.sites()
    assert dropout_modules <= set(sites)  # every dropout module is a reported site
    assert sites, "no sites found"
    for change in report:
        assert change.site == _expected(name, change.path), change
        if change.site == "residual":
            continue
        assert change.kind == "standard"
        assert change.rate == SITE_RATE[change.site]
        assert _value(model, change) == pytest.approx(SITE_RATE[change.site])
    # Each expected kind of site occurs (the patterns are not vacuous).
    assert {site for _, site in MODELS[name][2]} == set(sites.values())


def test_bert_and_gpt2_attention_rates_are_read_by_the_library_and_noted() -> None:
    for name in ("bert", "gpt2"):
        model = _build(name)
        _, report = droptune.apply(model, {"dropout": RATES}, example_input=_tokens())
        attention = [c for c in report if c.site == "attention"]
        assert len(attention) == 2
        assert all("reads p" in c.note for c in attention), attention
        assert "reads p" in str(report)


def test_without_example_input_the_sites_are_the_same_by_structure() -> None:
    for name in ("bert", "gpt2", "vit", "convnext"):
        traced = droptune.apply(_build(name), {"dropout": RATES}, example_input=MODELS[name][1]())
        plain = droptune.apply(_build(name), {"dropout": RATES})
        assert plain[1].sites() == traced[1].sites(), name


def test_convnext_stochastic_depth_keeps_the_models_depth_schedule() -> None:
    model = _build("convnext")
    paths = [p for p, m in model.named_modules() if type(m).__name__ == "ConvNextDropPath"]
    old = {p: model.get_submodule(p).drop_prob for p in paths}
    assert len(set(old.values())) == 3  # linearly increasing with depth (the first is Identity)
    _, report = droptune.apply(
        model, {"dropout": {"droppath_rate": 0.3}}, example_input=_images(32)
    )
    top = max(old.values())
    for path in paths:
        module = model.get_submodule(path)
        assert type(module).__name__ == "ConvNextDropPath"  # its own implementation kept
        assert module.drop_prob == pytest.approx(0.3 * old[path] / top)
    assert [c.path for c in report] == paths
    # kind none zeroes the schedule; the next apply restores its shape.
    droptune.apply(model, {"dropout": {"kind": "none", "droppath_rate": 0.3}})
    assert all(model.get_submodule(p).drop_prob == 0.0 for p in paths)
    droptune.apply(model, {"dropout": {"droppath_rate": 0.2}})
    for path in paths:
        assert model.get_submodule(path).drop_prob == pytest.approx(0.2 * old[path] / top)


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_output_is_unchanged_and_training_is_stochastic(name: str) -> None:
    model = _build(name).eval()
    example = MODELS[name][1]()
    with torch.no_grad():
        before = _logits(model, example)
    rng = torch.get_rng_state()
    droptune.apply(model, {"dropout": RATES}, example_input=example)
    assert torch.equal(torch.get_rng_state(), rng)  # the trace forks the random state
    assert not model.training  # the trace restores the flags
    with torch.no_grad():
        assert torch.equal(_logits(model, example), before)
        model.train()
        assert not torch.equal(_logits(model, example), _logits(model, example))


@pytest.mark.parametrize(
    ("name", "rates"),
    [
        ("bert", {"attention_rate": 0.3}),  # BERT hands this rate to SDPA itself
        ("gpt2", {"attention_rate": 0.3}),
        ("vit", {"attention_rate": 0.3}),  # a float attribute (transformers 5)
        ("t5", {"attention_rate": 0.3}),
        ("convnext", {"droppath_rate": 0.3}),
    ],
)
def test_a_single_site_rate_takes_effect_and_zero_is_deterministic(
    name: str, rates: dict[str, float]
) -> None:
    example = MODELS[name][1]()
    model = droptune.apply(_build(name), {"dropout": {"kind": "standard", **rates}})[0].train()
    with torch.no_grad():
        assert not torch.equal(_logits(model, example), _logits(model, example))
    droptune.apply(model, {"dropout": {"kind": "standard"}})  # every rate 0
    with torch.no_grad():
        assert torch.equal(_logits(model, example), _logits(model, example))


def _settings(report: droptune.layers.ApplyReport) -> dict[str, tuple[str, str, float | None]]:
    return {c.path: (c.site, c.kind, c.rate) for c in report}


@pytest.mark.parametrize("name", list(MODELS))
def test_reapply_with_another_config_gives_the_new_rates(name: str) -> None:
    example = MODELS[name][1]()
    old = {"dropout": {"kind": "none", **{k: 0.4 for k in RATES}}}
    new = {"dropout": RATES}
    model = droptune.apply(_build(name), {"dropout": {"kind": "gaussian", **RATES}})[0]
    droptune.apply(model, old, example_input=example)
    _, again = droptune.apply(model, new, example_input=example)
    fresh_model, fresh = droptune.apply(_build(name), new, example_input=example)
    assert _settings(again) == _settings(fresh)
    assert [_value(model, c) for c in again] == pytest.approx(
        [_value(fresh_model, c) for c in fresh]
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_loads_into_a_freshly_built_and_applied_model(name: str) -> None:
    config = {"dropout": {**RATES, "embedding_rate": 0.1}}
    example = MODELS[name][1]()
    trained = droptune.apply(_build(name, seed=0), config, example_input=example)[0].eval()
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = droptune.apply(_build(name, seed=1), config, example_input=example)[0].eval()
    restored.load_state_dict(state)
    plain = _build(name, seed=2).eval()  # never applied: the keys are the model's own
    plain.load_state_dict(state)
    with torch.no_grad():
        expected = _logits(trained, example)
        assert torch.equal(_logits(restored, example), expected)
        assert torch.equal(_logits(plain, example), expected)


def _names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("name", list(MODELS))
def test_param_groups_never_decay_biases_norms_or_padded_embeddings(name: str) -> None:
    model = droptune.apply(_build(name), {"dropout": RATES})[0]
    groups = droptune.param_groups(model, {"strength": 1e-4, "mode": "decoupled"})
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    decayed = _names(model, groups[0]["params"])
    owners = dict(model.named_modules())
    for path in decayed:
        owner_path, _, leaf = path.rpartition(".")
        owner = owners[owner_path]
        assert "bias" not in leaf, path
        assert "Norm" not in type(owner).__name__, path
        assert not (isinstance(owner, nn.Embedding) and owner.padding_idx is not None), path
        assert model.get_parameter(path).dim() >= 2, path
    assert any("Norm" in type(m).__name__ for m in owners.values())  # there are norms to skip
    assert decayed  # and weights to decay


def test_adamw_on_param_groups_keeps_berts_padding_row_fixed() -> None:
    model = _build("bert")
    embedding = model.bert.embeddings.word_embeddings
    assert embedding.padding_idx == 0
    with torch.no_grad():
        embedding.weight[0].fill_(1.0)  # a checkpoint whose padding row is not zero
    optimizer = torch.optim.AdamW(droptune.param_groups(model, 0.5), lr=0.1)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    query_before = query.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        _logits(model, _tokens()).square().mean().backward()
        optimizer.step()
    assert torch.equal(embedding.weight[0], torch.ones(32))
    assert not torch.allclose(query, query_before)  # the optimizer did run


def test_a_forward_that_fails_falls_back_to_registration_order_with_a_warning() -> None:
    bad_input = torch.randn(2, 7)  # float ids: the embedding raises inside the trace
    with pytest.warns(DroptuneWarning, match="example forward failed"):
        _, report = droptune.apply(_build("bert"), {"dropout": RATES}, example_input=bad_input)
    assert report.sites() == droptune.apply(_build("bert"), {"dropout": RATES})[1].sites()
    assert any("registration order" in note for note in report.notes)


def test_keyword_inputs_and_model_outputs_are_traced() -> None:
    model = _build("bert")
    example = {"input_ids": _tokens(), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroptuneWarning)
        _, report = droptune.apply(model, {"dropout": RATES}, example_input=example)
    assert any("reads p" in c.note for c in report)  # only a traced forward knows that


# ------------------------------------------------------------------------------------------
# Written like timm and torchvision


class TimmDropPath(nn.Module):
    """timm's ``DropPath``: ``drop_prob``, ``scale_by_keep``."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth``: ``p`` and ``mode`` (``row`` or ``batch``)."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        keep = 1.0 - self.p
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Attention(nn.Module):
    """timm's fused ``Attention``: ``attn_drop.p`` goes to SDPA, ``proj_drop`` is called."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(n, t, d)))


class EagerAttention(Attention):
    """timm's non-fused path: ``attn_drop`` is called on the probabilities."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(n, t, d)))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * 2)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.1)
        self.fc2 = nn.Linear(dim * 2, dim)
        self.drop2 = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, path_rate: float, eager: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (EagerAttention if eager else Attention)(dim, 2)
        self.drop_path1 = TimmDropPath(path_rate) if path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        self.drop_path2 = StochasticDepth(path_rate, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class TimmStyleViT(nn.Module):
    """Patch conv → flatten → + pos → pos_drop → blocks (drop path 0, .05, .1) → head_drop."""

    def __init__(self, depth: int = 3, dim: int = 16, eager: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.bn = nn.BatchNorm2d(dim)  # buffers the trace must leave alone
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, dim))
        self.pos_drop = nn.Dropout(0.1)
        rates = [0.1 * i / (depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(dim, r, eager) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.patch_embed(x)).flatten(2).transpose(1, 2)
        x = self.blocks(self.pos_drop(x + self.pos_embed))
        return self.head(self.head_drop(self.norm(x).mean(dim=1)))


TIMM_SITES = {
    "pos_drop": "input",
    "attn.attn_drop": "attention",
    "attn.proj_drop": "hidden",
    "mlp.drop1": "hidden",
    "mlp.drop2": "hidden",
    "drop_path1": "residual",
    "drop_path2": "residual",
    "head_drop": "hidden",
}


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_timm_and_torchvision_style_sites(eager: bool, traced: bool) -> None:
    torch.manual_seed(0)
    model = TimmStyleViT(eager=eager)
    example = _images(16)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "bn." in k}
    _, report = droptune.apply(
        model, {"dropout": RATES}, example_input=example if traced else None
    )
    for change in report:
        key = re.sub(r"^blocks\.\d+\.", "", change.path)
        assert change.site == TIMM_SITES[key], change
    # 2 outside the blocks, 4 dropouts per block, drop_path1 of blocks 1-2 (block 0 has an
    # Identity), drop_path2 of every block.
    assert len(report) == 2 + 3 * 4 + 2 + 3
    for key, value in buffers.items():
        assert torch.equal(model.state_dict()[key], value), key  # BatchNorm stats untouched
    # Depth schedule: block i had 0.05 * i on both residual branches; now 0.3 * i / 2.
    for i, block in enumerate(model.blocks):
        assert block.drop_path2.p == pytest.approx(0.15 * i)
        assert isinstance(block.drop_path2, StochasticDepth) and block.drop_path2.mode == "row"
        if i:
            assert block.drop_path1.drop_prob == pytest.approx(0.15 * i)
    assert model.blocks[1].attn.attn_drop.p == 0.15
    assert model.pos_drop.p == 0.05 and model.head_drop.p == 0.2
    if traced and not eager:
        note = next(c.note for c in report if c.path == "blocks.0.attn.attn_drop")
        assert "reads p" in note


def test_a_kind_the_library_cannot_apply_is_refused_naming_the_module() -> None:
    class FusedProjection(nn.Module):
        """Reads ``proj_drop.p`` and calls F.dropout itself (a hidden site, rate only)."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.proj_drop = nn.Dropout(0.1)
            self.dropout = 0.1  # a float rate read by forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.dropout(self.fc(x), self.proj_drop.p, self.training)
            return F.dropout(x, self.dropout, self.training)

    x = torch.randn(2, 4)
    model = FusedProjection()
    with pytest.raises(ConfigError, match=r"'gaussian' cannot take effect at 'proj_drop'"):
        droptune.apply(
            model, {"dropout": {"kind": "gaussian", "hidden_rate": 0.2}}, example_input=x
        )
    assert type(model.proj_drop) is nn.Dropout  # refused before anything changed
    with pytest.raises(ConfigError, match=r"cannot take effect at 'dropout'.*sites="):
        droptune.apply(
            model,
            {"dropout": {"kind": "gaussian", "hidden_rate": 0.2}},
            example_input=x,
            sites={"proj_drop": "keep"},
        )
    _, report = droptune.apply(
        model,
        {"dropout": {"kind": "gaussian", "hidden_rate": 0.2}},
        example_input=x,
        sites={"proj_drop": "keep", "dropout": "keep"},
    )
    assert len(report) == 0
    _, report = droptune.apply(model, {"dropout": {"hidden_rate": 0.2}}, example_input=x)
    assert report.sites() == {"proj_drop": "hidden", "dropout": "hidden"}
    assert model.proj_drop.p == 0.2 and model.dropout == 0.2


def test_a_float_hyperparameter_the_forward_never_reads_is_not_a_site() -> None:
    class Net(nn.Module):
        def __init__(self, dropout: float = 0.3) -> None:
            super().__init__()
            self.dropout = dropout  # only used to build the module below
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(dropout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(x))

    for example in (None, torch.randn(2, 4)):
        model, report = droptune.apply(
            Net(), {"dropout": {"hidden_rate": 0.2}}, example_input=example
        )
        assert report.sites() == {"drop": "hidden"}
        assert model.dropout == 0.3


def test_unknown_dropout_like_modules_are_noted_not_changed() -> None:
    class DropBlock2d(nn.Module):  # timm's, which apply does not replace
        def __init__(self) -> None:
            super().__init__()
            self.drop_prob = 0.1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), DropBlock2d(), nn.Dropout(0.1))
    _, report = droptune.apply(model, {"dropout": {"conv_rate": 0.2}})
    assert report.paths() == ["2"]
    assert model[1].drop_prob == 0.1
    assert "1 (DropBlock2d)" in " ".join(report.notes)
    assert "note: dropout-like modules apply does not know" in str(report)


def test_a_library_drop_path_given_another_site_becomes_that_sites_dropout() -> None:
    torch.manual_seed(0)
    model = TimmStyleViT()
    _, report = droptune.apply(
        model,
        {"dropout": {"kind": "gaussian", "hidden_rate": 0.2}},
        sites={"blocks.1.drop_path1": "hidden"},
    )
    assert type(model.blocks[1].drop_path1) is droptune.layers.GaussianDropout
    assert model.blocks[1].drop_path1.p == 0.2
    assert report.sites()["blocks.1.drop_path1"] == "hidden"
    assert isinstance(model.blocks[2].drop_path1, TimmDropPath)  # the others stay


def test_a_dropout_module_used_twice_is_noted() -> None:
    # T5 runs encoder.dropout after the embedding and again after the final layer norm.
    _, report = droptune.apply(_build("t5"), {"dropout": RATES}, example_input=MODELS["t5"][1]())
    change = next(c for c in report if c.path == "encoder.dropout")
    assert change.site == "input" and "runs at 2 places" in change.note
