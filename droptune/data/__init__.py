"""Built-in data (digits, MNIST-1D, synthetic, CSV) and users' DataModules, as Lightning
DataModules with a fast in-memory tensor loader."""

from droptune.data._build import build_datamodule
from droptune.data._build import describe
from droptune.data._build import import_object
from droptune.data._build import resolve_layout
from droptune.data._builtin import load_csv
from droptune.data._builtin import load_digits
from droptune.data._builtin import load_mnist1d
from droptune.data._builtin import make_synthetic
from droptune.data._loader import DataInfo
from droptune.data._loader import TensorDataModule
from droptune.data._loader import TensorLoader


__all__ = [
    "DataInfo",
    "TensorDataModule",
    "TensorLoader",
    "build_datamodule",
    "describe",
    "import_object",
    "load_csv",
    "load_digits",
    "load_mnist1d",
    "make_synthetic",
    "resolve_layout",
]
