"""Secure aggregation with Flower's SecAgg+ (legacy stack), client-side clipping and central noise.
"""

from __future__ import annotations

from fl_app.settings import Settings

INDIVIDUAL_UPDATE_RULES = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan",
                           "geometric-median", "centered-clipping")


def check_secure_aggregation(settings: Settings) -> None:
    """Refuse settings that SecAgg+ cannot serve (errors name the keys)."""
    rule = settings.aggregation_rule if settings.strategy in ("robust", "dp-fedavg") else settings.strategy
    if settings.strategy not in ("fedavg", "dp-fedavg", "robust") or rule != "mean":
        raise ValueError(
            f"secure-aggregation=true: the server only sees the sum of the updates, so strategy "
            f"'{settings.strategy}' (rule '{rule}') that needs individual updates cannot run; use "
            f"strategy='dp-fedavg' (aggregation-rule='mean') or strategy='fedavg'"
        )
    if settings.strategy == "dp-fedavg" and settings.dp_mode == "central":
        raise ValueError(
            "secure-aggregation=true with strategy='dp-fedavg' needs dp-mode='client-clipping' (or a "
            "local mode): the server cannot clip updates it never sees"
        )
    if settings.strategy == "dp-fedavg" and settings.dp_sampling != "fixed-size":
        raise ValueError(
            "secure-aggregation=true with strategy='dp-fedavg' needs dp-sampling='fixed-size' "
            "(SecAgg+ needs a known set of at least 2 clients per round)"
        )
