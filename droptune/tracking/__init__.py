"""MLflow tracking: one run per trial under one run per study, study plots, sync."""

from droptune.tracking._client import STATUS_BY_STATE
from droptune.tracking._client import Tracker
from droptune.tracking._client import default_tracking_uri
from droptune.tracking._live import LiveMetrics
from droptune.tracking._study import StudyTracking
from droptune.tracking._study import tracking_uri


__all__ = [
    "STATUS_BY_STATE",
    "LiveMetrics",
    "StudyTracking",
    "Tracker",
    "default_tracking_uri",
    "tracking_uri",
]
