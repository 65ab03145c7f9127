"""Which settings SecAgg+ can serve (checked with the rest of the run config, before training)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fl_app.config.settings import Settings


def check_secagg_dp(settings: Settings) -> None:
    """Refuse ``secagg-dp`` / ``secagg-dp-min-clients`` values that would be ignored or cannot run
    (errors name the keys); the noise-dependent checks are :class:`strategies.private.secure_sum.SecureSumMechanism`'s."""
    from strategies.private.secure_sum import PLACEMENTS, is_power_of_two

    if settings.secagg_dp not in PLACEMENTS:
        raise ValueError(f"secagg-dp must be one of {', '.join(PLACEMENTS)}; got '{settings.secagg_dp}'")
    if settings.secagg_dp == "central" and not settings.secagg_dp_min_clients:
        return
    if not (settings.secure_aggregation and settings.strategy == "dp-fedavg"):
        raise ValueError(
            f"secagg-dp='{settings.secagg_dp}' with secagg-dp-min-clients={settings.secagg_dp_min_clients} "
            "sets the noise of SecAgg+ with DP: it needs secure-aggregation=true and strategy='dp-fedavg' "
            "(else set secagg-dp='central' and secagg-dp-min-clients=0)"
        )
    if settings.secagg_dp == "central":
        raise ValueError("secagg-dp-min-clients applies to secagg-dp='distributed' only; set it to 0")
    m = settings.sampling_params().clients_per_round()
    if settings.secagg_dp_min_clients > m:
        raise ValueError(
            f"secagg-dp-min-clients must be in [0, clients per round = {m}], got {settings.secagg_dp_min_clients}"
        )
    for key, value in (
        ("secagg-clipping-range", settings.secagg_clipping_range),
        ("secagg-quantization-range", settings.secagg_quantization_range),
    ):
        if not is_power_of_two(value):
            raise ValueError(
                f"secagg-dp='distributed' needs {key} to be a power of two (so that the clients' values "
                f"on SecAgg+'s grid are quantised exactly), got {value:g}"
            )


def check_secure_aggregation(settings: Settings) -> None:
    """Refuse settings that SecAgg+ cannot serve (errors name the keys)."""
    # FedAvg is the mean; robust and dp-fedavg run the rule named by aggregation-rule
    rule = {"fedavg": "mean", "robust": settings.aggregation_rule, "dp-fedavg": settings.aggregation_rule}.get(
        settings.strategy, settings.strategy
    )
    if settings.strategy not in ("fedavg", "dp-fedavg", "robust") or rule != "mean":
        raise ValueError(
            f"secure-aggregation=true: the server only sees the sum of the updates, so strategy "
            f"'{settings.strategy}' (aggregation rule '{rule}') that needs individual updates cannot run; "
            f"use strategy='dp-fedavg' or 'fedavg' (aggregation-rule='mean')"
        )
    if settings.strategy == "dp-fedavg" and settings.dp_mode != "client-clipping":
        raise ValueError(
            f"secure-aggregation=true with strategy='dp-fedavg' needs dp-mode='client-clipping', got "
            f"'{settings.dp_mode}': the server cannot clip updates it never sees, and adds the noise itself"
        )
    if settings.strategy == "dp-fedavg" and settings.dp_sampling != "fixed-size":
        raise ValueError(
            "secure-aggregation=true with strategy='dp-fedavg' needs dp-sampling='fixed-size' (SecAgg+ "
            "runs on a known set of clients per round)"
        )
    m = settings.sampling_params().clients_per_round()
    shares, threshold = settings.secagg_num_shares, settings.secagg_reconstruction_threshold
    if shares < 3 or shares > m:
        raise ValueError(
            f"secagg-num-shares must be in [3, clients per round = {m}] (max(min-train-clients, "
            f"fraction-train * num-partitions)), got {shares}"
        )
    if not 2 <= threshold < shares:
        raise ValueError(
            f"secagg-reconstruction-threshold must be in [2, secagg-num-shares = {shares}), got {threshold}"
        )
    if settings.secagg_quantization_range < 2 or settings.secagg_quantization_range * m >= 2**32:
        raise ValueError(
            f"secagg-quantization-range must be >= 2 and its product with the clients per round ({m}) "
            f"< 2**32, got {settings.secagg_quantization_range}"
        )
