"""A user's own code, imported by droptune through ``tests.user_code.<module>:<Class>``.

Nothing here knows about droptune: a LightningModule with its own ``nn.Dropout`` layers and
optimizer (weight decay and an LR scheduler set), a plain ``nn.Module`` and a LightningDataModule.
"""

from tests.user_code.datamodules import BlobsDataModule
from tests.user_code.models import NotAModule
from tests.user_code.models import UserClassifier
from tests.user_code.models import UserMLP


__all__ = ["BlobsDataModule", "NotAModule", "UserClassifier", "UserMLP"]
