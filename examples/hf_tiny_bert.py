"""A Hugging Face model, as it comes, tuned by droptune: a tiny BERT built from its config.

``studies/custom-hf-bert.yaml`` tunes its regularization with ``model.family: custom``
(``model.target: examples.hf_tiny_bert:TinyBert``) on :class:`TokenTask`, a generated
sequence-classification task (``data.name: datamodule``). Nothing is downloaded: the model is
built from a ``BertConfig`` with random weights, the data from a seed.

``droptune.apply`` finds BERT's own dropout modules and sets them by site: the embedding
dropout is ``input``, the attention-probability dropout ``attention`` (BERT hands its rate to
``scaled_dot_product_attention``, so only standard dropout happens there), the dropout after
each attention output and feed-forward block and the classifier's are ``hidden``.

Run: ``droptune run studies/custom-hf-bert.yaml`` (needs ``pip install 'droptune[hf]'``), or
``python examples/hf_tiny_bert.py`` to print the sites apply finds.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset


class TinyBert(nn.Module):
    """``BertForSequenceClassification`` from a small ``BertConfig``; ``forward`` returns logits.

    The wrapper exists because droptune's ``custom`` family builds a model from keyword
    arguments (a YAML mapping), while ``BertForSequenceClassification`` takes a config object.
    Dropout rates in the config are where droptune's tuned rates go (``apply`` never inserts
    dropout), so they start at BERT's own 0.1.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        hidden_size: int = 32,
        layers: int = 2,
        heads: int = 2,
        intermediate_size: int = 64,
        max_length: int = 16,
        num_labels: int = 2,
    ) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers import BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_length,
            num_labels=num_labels,
            pad_token_id=0,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=input_ids.ne(0).long()).logits


class TokenTask(pl.LightningDataModule):
    """Generated token sequences: the label says whether "positive" tokens outnumber
    "negative" ones (tokens 1-4 vs 5-8 of a vocabulary whose other tokens are noise), with a
    fraction of labels flipped so that a model can overfit the training split.

    Args:
        n: Sequences (60 % train, 20 % validation, 20 % test).
        length: Tokens per sequence (no padding).
        vocab_size: Token ids 1 .. vocab_size - 1 (0 is padding).
        label_noise: Fraction of training labels flipped.
        batch_size: Batch size of both loaders.
        seed: Seed of the generator.
    """

    num_classes = 2

    def __init__(
        self,
        n: int = 768,
        length: int = 16,
        vocab_size: int = 32,
        label_noise: float = 0.1,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n, self.length, self.vocab_size = n, length, vocab_size
        self.label_noise, self.batch_size, self.seed = label_noise, batch_size, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(1, self.vocab_size, (self.n, self.length), generator=gen)
        positive = ((tokens >= 1) & (tokens <= 4)).sum(dim=1)
        negative = ((tokens >= 5) & (tokens <= 8)).sum(dim=1)
        labels = (positive > negative).long()
        cut, held = self.n * 3 // 5, self.n * 4 // 5
        flip = torch.rand(cut, generator=gen) < self.label_noise
        train_labels = torch.where(flip, 1 - labels[:cut], labels[:cut])
        self.train_set = TensorDataset(tokens[:cut], train_labels)
        self.val_set = TensorDataset(tokens[cut:held], labels[cut:held])
        self.test_set = TensorDataset(tokens[held:], labels[held:])

    def train_dataloader(self) -> Any:
        assert self.train_set is not None
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> Any:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> Any:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=self.batch_size)


def main() -> None:
    import droptune

    data = TokenTask()
    data.setup()
    assert data.train_set is not None
    example = data.train_set.tensors[0][:2]
    _, report = droptune.apply(
        TinyBert(),
        {"dropout": {"input_rate": 0.05, "hidden_rate": 0.2, "attention_rate": 0.1}},
        example_input=example,
    )
    print(report)


if __name__ == "__main__":
    main()
