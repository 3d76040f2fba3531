"""The core's driver under its first name (the README's `from cap.pruner import Pruner`); see cap.core.pruner."""

from cap.core.pruner import PruneEvent, Pruner, PrunerState  # noqa: F401
from cap.core.sync import RankSync  # noqa: F401
