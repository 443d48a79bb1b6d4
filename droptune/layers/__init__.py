"""Regularization primitives: every dropout kind, DropConnect, variational RNNs, attention,
max-norm, L2 parameter groups, MC-dropout prediction and :func:`apply` for users' own models.

Every dropout module takes a float rate or a ``[P]`` tensor of rates (a population of P models
whose activations carry a leading ``[P, ...]`` axis), is the identity in eval mode, and shows its
settings in ``repr``.
"""

from droptune.layers._apply import apply
from droptune.layers._attention import SelfAttention
from droptune.layers._base import DropoutBase
from droptune.layers._base import check_rate
from droptune.layers._constraints import decay_split
from droptune.layers._constraints import l2_penalty
from droptune.layers._constraints import max_norm_
from droptune.layers._constraints import param_groups
from droptune.layers._elementwise import AlphaDropout
from droptune.layers._elementwise import Dropout
from droptune.layers._elementwise import GaussianDropout
from droptune.layers._elementwise import NoDropout
from droptune.layers._factory import DROPOUT_KINDS
from droptune.layers._factory import ELEMENTWISE_KINDS
from droptune.layers._factory import make_dropout
from droptune.layers._mc import mc_dropout
from droptune.layers._mc import mc_predict
from droptune.layers._recurrent import VariationalGRU
from droptune.layers._recurrent import VariationalLSTM
from droptune.layers._report import ApplyReport
from droptune.layers._report import Change
from droptune.layers._structured import DropBlock
from droptune.layers._structured import DropoutEmbedding
from droptune.layers._structured import DropPath
from droptune.layers._structured import EmbeddingDropout
from droptune.layers._structured import LockedDropout
from droptune.layers._structured import SpatialDropout
from droptune.layers._weight import DropConnect
from droptune.layers._weight import add_weight_dropout
from droptune.layers._weight import remove_weight_dropout


__all__ = [
    "DROPOUT_KINDS",
    "ELEMENTWISE_KINDS",
    "AlphaDropout",
    "ApplyReport",
    "Change",
    "DropBlock",
    "DropConnect",
    "DropPath",
    "Dropout",
    "DropoutBase",
    "DropoutEmbedding",
    "EmbeddingDropout",
    "GaussianDropout",
    "LockedDropout",
    "NoDropout",
    "SelfAttention",
    "SpatialDropout",
    "VariationalGRU",
    "VariationalLSTM",
    "add_weight_dropout",
    "apply",
    "check_rate",
    "decay_split",
    "l2_penalty",
    "make_dropout",
    "max_norm_",
    "mc_dropout",
    "mc_predict",
    "param_groups",
    "remove_weight_dropout",
]
