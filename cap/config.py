"""The configuration API under its first name (`from cap.config import PruneConfig`); see cap.engine.config."""

from cap.engine.config import *  # noqa: F403
