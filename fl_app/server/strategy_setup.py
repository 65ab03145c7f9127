"""The configured strategy, guarded, with what the server adds around it (simulated attacks, decoders)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fl_app.config.settings import Settings, codec_from_settings
from strategies.aggregation.guard import GuardedStrategy
from strategies.aggregation.strategy import AggregationStrategy
from strategies.compression.decoder import UpdateDecoder
from strategies.private.dp_fedavg import DpFedAvgStrategy
from strategies.private.dp_ftrl import DpFtrlStrategy
from strategies.registry import build_strategy, check_user_strategy

COLLECTING_STRATEGIES = (AggregationStrategy, DpFedAvgStrategy, DpFtrlStrategy)
"""Our strategies: their :class:`~strategies.aggregation.collector.ReplyCollector` decodes and
validates every reply, and runs the server-side hooks."""


def attach_simulated_attack(settings: Settings, strategy: Strategy) -> None:
    """Omniscient attacks (ALIE, IPM) act on the server, inside our aggregation strategy."""
    from fl_app.attacks.catalogue import ATTACKS

    if not any(name != "none" and ATTACKS[name].omniscient for name in settings.attack_names()):
        return
    from fl_app.attacks.poisoning import OmniscientAttack

    if not isinstance(strategy, COLLECTING_STRATEGIES):
        raise ValueError(
            f"attack '{settings.attack}' is simulated on the server and needs one of our aggregation "
            f"strategies (strategy='robust' with aggregation-rule='mean' is FedAvg); got '{settings.strategy}'"
        )
    strategy.collector.hooks.append(OmniscientAttack(settings))


def make_strategy(settings: Settings) -> GuardedStrategy:
    """The configured strategy, built from the settings' typed parameters, inside a
    :class:`GuardedStrategy` so that no unscreened train reply reaches it; with homomorphic
    encryption the server loads only the public key (``he-public-key-path``; ``he-secret-key-path``
    is never read here)."""
    if settings.homomorphic_encryption != "none":
        from strategies.encrypted.strategy import build_encrypted_strategy

        return GuardedStrategy(
            build_encrypted_strategy(
                settings.encryption_params(),
                strategy=settings.strategy,
                aggregation=settings.aggregation_params(),
                proximal_mu=settings.proximal_mu,
            )
        )
    params = settings.strategy_params()
    for name in (settings.strategy, settings.dp_inner_strategy if settings.strategy == "dp-fedavg" else ""):
        check_user_strategy(name, params)  # a user's dotted-path strategy, on a synthetic round
    strategy = build_strategy(settings.strategy, params)
    attach_simulated_attack(settings, strategy)
    attach_compression(settings, strategy)
    return GuardedStrategy(strategy)


def attach_compression(settings: Settings, strategy: Strategy) -> UpdateDecoder | None:
    """Give ``strategy`` the decoder of the configured codec (None when compression is off); the
    strategy passes each round's number to it.

    Raises ValueError when compression is on and ``strategy`` is not one of our aggregation
    strategies (Flower's built-ins would average the payload arrays as if they were weights).
    """
    if settings.compression == "none":
        return None
    if not isinstance(strategy, COLLECTING_STRATEGIES):
        raise ValueError(
            f"compression='{settings.compression}' needs one of our aggregation strategies, which "
            f"decode uploads before aggregating (e.g. strategy='robust' aggregation-rule='mean' "
            f"client-weighting='num-examples' is FedAvg); got strategy '{settings.strategy}'"
        )
    decoder = UpdateDecoder(codec_from_settings(settings))
    strategy.collector.decoder = decoder
    return decoder
