"""What a run's epsilon covers, field by field, and what is released beside it.

A differentially private run releases more than its model: history fields, client metrics,
logs. Each field is one of three things under each DP mode, and this module is the one place
that says which (summary.json and the model card print it; docs/privacy.md has the table):

* **covered**: a function of the released (noised) aggregates only, i.e. post-processing;
* **not sent**: the client leaves it out of its reply (:func:`fl_app.client.update_privacy.released_train_metrics`),
  or the server leaves it out of the history (:mod:`strategies.private.dp_fedavg`);
* **outside the guarantee**: released exactly, and stated as not covered by epsilon.
"""

from __future__ import annotations

from fl_app.config.settings import Settings

USER_LEVEL_COVERED = (
    "the global model after every round (each round's released, noised aggregate) and everything "
    "computed from it: update-norm, centralized loss and metrics on the server's own test set, the "
    "adaptive clip-norm (from the noised count), noise-std, epsilon"
)
USER_LEVEL_NOT_SENT = (
    "clients' train loss, train metrics, fit seconds and partition id (replies carry num-examples = 1); "
    "the exact count of clipped updates"
)
USER_LEVEL_OUTSIDE = (
    "federated evaluation (clients' exact loss and metrics on their own test data; set "
    "fraction-evaluate to the smallest value or use centralized evaluation only), the counts of "
    "sampled, accepted, rejected and failed replies and the rejection reasons (which node sent a "
    "malformed reply), timing"
)
DP_FTRL_RELATION = (
    "zero-out (dp_accounting's REPLACE_SPECIAL; Kairouz et al. 2021, Definition 1.1): neighbouring federations "
    "differ in one user's data, replaced by a user whose every update is zero; a user is a Flower node id and "
    "contributes at most once per epoch (tree restart), which the server enforces; no sampling is assumed"
)
DP_FTRL_OUTSIDE = (
    USER_LEVEL_OUTSIDE + "; which nodes were asked in which round (the participation schedule, not hidden by "
    "DP-FTRL); a person who takes part under several node ids (each id is a separate user)"
)
EXAMPLE_LEVEL_COVERED = "each client's model updates, given its number of examples"
EXAMPLE_LEVEL_NOT_SENT = "clients' train loss, train metrics and fit seconds"
EXAMPLE_LEVEL_OUTSIDE = (
    "each client's num-examples and its dp-sgd-epsilon (a function of it): example-level DP "
    "takes the data set's size as public; federated evaluation on the clients' test data"
)


SECAGG_CENTRAL_AGAINST_SERVER = (
    "NOT covered: with secure-aggregation=true and secagg-dp='central' the server unmasks the exact sum "
    "of the clipped updates and only then adds the noise, so epsilon holds against recipients of the "
    "model, not against the server (set secagg-dp='distributed' for DP against the server)"
)
SECAGG_DISTRIBUTED_AGAINST_SERVER = (
    "covered: with secagg-dp='distributed' every client adds its share of discrete Gaussian noise before "
    "masking (Kairouz, Liu, Steinke 2021), so the server only unmasks a noised sum; epsilon uses the noise "
    "of the clients that survived each round and holds against an honest-but-curious server that "
    "colludes with no client, at delta + secagg-clamp-delta (history)"
)


def user_level_dp(settings: Settings) -> bool:
    """Whether the run is user-level DP (DP-FedAvg in any mode, with or without SecAgg+, or DP-FTRL)."""
    return settings.strategy in ("dp-fedavg", "dp-ftrl")


def example_level_dp(settings: Settings) -> bool:
    """Whether the clients run DP-SGD (example-level DP)."""
    return settings.dp_sgd_noise_multiplier > 0


def privacy_scope(settings: Settings) -> dict[str, dict[str, str]]:
    (
        """``{"user level" | "example level": {"covered", "not sent", "outside the guarantee"}}`` for the
    guarantees this run has (empty when it has none); DP-FTRL's adds its ``"neighbouring relation"``."""
        ""
    )
    scope: dict[str, dict[str, str]] = {}
    if settings.strategy == "dp-ftrl":
        scope["user level"] = {
            "covered": USER_LEVEL_COVERED,
            "not sent": USER_LEVEL_NOT_SENT,
            "outside the guarantee": DP_FTRL_OUTSIDE,
            "neighbouring relation": DP_FTRL_RELATION,
        }
    elif user_level_dp(settings):
        scope["user level"] = {
            "covered": USER_LEVEL_COVERED,
            "not sent": USER_LEVEL_NOT_SENT,
            "outside the guarantee": USER_LEVEL_OUTSIDE,
        }
        if settings.secure_aggregation:
            scope["user level"]["against the server"] = (
                SECAGG_DISTRIBUTED_AGAINST_SERVER
                if settings.secagg_dp == "distributed"
                else SECAGG_CENTRAL_AGAINST_SERVER
            )
    if example_level_dp(settings):
        scope["example level"] = {
            "covered": EXAMPLE_LEVEL_COVERED,
            "not sent": EXAMPLE_LEVEL_NOT_SENT,
            "outside the guarantee": EXAMPLE_LEVEL_OUTSIDE,
        }
    return scope
