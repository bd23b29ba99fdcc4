"""Size limits the server applies to request bodies, from its configuration and the model."""

from __future__ import annotations

from aggregator.config import AggregatorConfig
from fedkb_core.wire import max_update_bytes


def update_size_limit(config: AggregatorConfig, num_params: int) -> int:
    """Largest accepted upload: the operator's `max_body_bytes`, else a float32 update plus header."""
    if config.max_body_bytes is not None:
        return config.max_body_bytes
    return max_update_bytes(num_params)
