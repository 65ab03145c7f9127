"""The model card: a short markdown summary of what was trained, how, and how well it does.

After Mitchell et al. 2019 ("Model Cards for Model Reporting"), cut down to what a federated run
knows: data set and partitioning, strategy and its parameters, rounds, privacy guarantee, robustness
settings, the model's headline metric (accuracy, or e.g. ``auc``, ``mae``: centralized, federated,
TFLite) and its other metrics, and model size, and whether the export passed
its check before shipping.

Privacy and robustness settings are read from whatever run-config keys exist (``dp-*``,
``aggregation-rule``, ``clip-norm``, ...; any field whose name starts with one of
:data:`PRIVACY_PREFIXES` / :data:`ROBUSTNESS_PREFIXES`), and epsilon from the last round's
``extra["epsilon"]`` (what a DP strategy reports through its MetricRecord), so the card grows with
the settings without changes here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fl_app.config.privacy_scope import DP_FTRL_RELATION, privacy_scope, user_level_dp
from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord, headline
from fl_app.server.summary import largest_example_epsilon

PRIVACY_PREFIXES = ("dp_", "privacy_", "secagg", "secure_")
ROBUSTNESS_PREFIXES = (
    "aggregation_rule",
    "clip_norm",
    "norm_bound",
    "trim",
    "krum",
    "byzantine",
    "robust",
    "attack",
    "num_malicious",
    "bulyan",
)

_STRATEGY_PARAMS = {
    "fedprox": ("proximal_mu",),
    "fedadam": ("server_learning_rate",),
    "fedyogi": ("server_learning_rate",),
    "fedadagrad": ("server_learning_rate",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
}


_DP_SGD_ACCOUNTING = {
    "poisson": "Poisson sampling (q = batch-size / n per step, secret generator; add/remove-one example)",
    "shuffle": "shuffled fixed-size batches of a public permutation (no amplification: one Gaussian of "
    "multiplier z / 2 per epoch; replace-one example)",
}
"""What the DP-SGD epsilon is the epsilon of, per ``dp-sgd-sampling``."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    return f"{num_bytes / 1024:.1f} KiB ({num_bytes:,} bytes)"


def _fields_with_prefix(settings: Settings, prefixes: tuple[str, ...]) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name.startswith(prefixes)}


def user_level_relation(settings: Settings) -> str:
    """The neighbouring relation and the sampling the user-level epsilon is stated for."""
    if settings.strategy == "dp-ftrl":
        return DP_FTRL_RELATION
    if settings.dp_mode in ("local-gaussian", "local-laplace"):
        return (
            "local DP: each client's update is private against everyone, the server included, for "
            "any change of that update; composed over the rounds, no amplification by sampling claimed"
        )
    if settings.secure_aggregation or settings.dp_sampling == "fixed-size":
        return (
            "neighbouring data sets differ by replacing one client's data; m clients sampled per round "
            "without replacement (a secret generator)"
        )
    return (
        "neighbouring data sets differ by adding or removing one client's data; each client sampled "
        "per round with probability fraction-train (Poisson, a secret generator)"
    )


def privacy_lines(settings: Settings, history: list[RoundRecord]) -> list[str]:
    """The privacy guarantee: (epsilon, delta) and level for each mechanism that ran, else 'none'."""
    epsilon = next((r.extra["epsilon"] for r in reversed(history) if "epsilon" in r.extra), None)
    example_epsilon = largest_example_epsilon(history)
    user_level = user_level_dp(settings) or settings.secure_aggregation
    mode = "dp-ftrl, tree aggregation" if settings.strategy == "dp-ftrl" else settings.dp_mode
    example_level = settings.dp_sgd_noise_multiplier > 0
    if not (user_level or example_level or epsilon is not None):
        return ["- none: no differential privacy was configured (no formal guarantee)"]
    rounds = sum(1 for r in history if r.round > 0)
    lines = []
    if user_level or epsilon is not None:
        if epsilon is not None:
            lines.append(
                f"- user level ({mode}): (epsilon = {_fmt(float(epsilon))}, delta = "
                f"{_fmt(settings.dp_delta)})-DP after {rounds} rounds, accounted with "
                f"{settings.dp_accounting.upper()}; {user_level_relation(settings)}"
            )
        else:
            lines.append(
                f"- user level ({mode}): no epsilon was reported; target epsilon "
                f"{_fmt(settings.dp_target_epsilon)}, delta {_fmt(settings.dp_delta)}"
            )
    if example_level:
        value = "not reported" if example_epsilon is None else f"epsilon = {_fmt(float(example_epsilon))}"
        lines.append(
            f"- example level (DP-SGD on the clients): largest client over all rounds {value}, delta = {_fmt(settings.dp_delta)}, "
            f"accounted with {settings.dp_accounting.upper()} for {_DP_SGD_ACCOUNTING[settings.dp_sgd_sampling]}"
        )
    for level, parts in privacy_scope(settings).items():
        lines.extend(f"- {level}, {part}: {text}" for part, text in parts.items())
    fields = _fields_with_prefix(settings, PRIVACY_PREFIXES)
    lines.extend(f"- `{_key(k)}` = {_fmt(v)}" for k, v in fields.items())
    return lines


def robustness_lines(settings: Settings, history: list[RoundRecord]) -> list[str]:
    fields = _fields_with_prefix(settings, ROBUSTNESS_PREFIXES)
    lines = [f"- `{_key(k)}` = {_fmt(v)}" for k, v in fields.items()]
    if not lines:
        lines.append(f"- aggregation: the strategy's own rule (`{settings.strategy}`); no robust-aggregation settings")
    lines.append(f"- client replies that failed: {sum(r.clients_failed for r in history)}")
    rejected = [r.extra["rejected"] for r in history if isinstance(r.extra.get("rejected"), (int, float))]
    if rejected:
        lines.append(f"- replies rejected by the strategy: {int(sum(rejected))}")
    return lines


def render(
    settings: Settings,
    history: list[RoundRecord],
    *,
    parameters: int | None,
    keras_size: int | None,
    export_report: dict | None,
    num_server_test: int | None,
) -> str:
    """The model card as markdown."""
    from fl_app.task.output_spec import lower_is_better

    trained = [r for r in history if r.round > 0]
    last = history[-1] if history else RoundRecord(round=0)
    metric = headline(history) or "accuracy"
    sign = -1.0 if lower_is_better(metric) else 1.0
    best = max(
        (r for r in history if r.value("centralized", metric) is not None),
        key=lambda r: sign * float(r.value("centralized", metric) or 0.0),
        default=None,
    )
    data = settings.dataset
    if settings.dataset == "huggingface":
        data += f" (`{settings.hf_dataset}`)"
    elif settings.dataset == "local-file":
        data += f" (each node's own file; `data-path` = `{settings.data_path}`)"
    partition = settings.partitioner
    if settings.partitioner == "dirichlet":
        partition += f" (alpha = {settings.dirichlet_alpha})"
    elif settings.partitioner == "shards":
        partition += f" ({settings.shards_per_client} shards per client)"
    strategy_params = ", ".join(
        f"`{_key(p)}` = {getattr(settings, p)}" for p in _STRATEGY_PARAMS.get(settings.strategy, ())
    )
    lines = [
        f"# Model card: `{settings.model}` trained with `{settings.strategy}`",
        "",
        "## Data",
        f"- task: {settings.task}" + (f" (metrics: {', '.join(last.metric_names())})" if last.metric_names() else ""),
        f"- data set: {data}",
        f"- partitioning: {partition} over {settings.num_partitions} clients; each client keeps "
        f"{settings.test_fraction:.0%} of its share as its test split",
        f"- server held-out test set: {settings.server_test_fraction:.0%} of the pool (stratified)"
        + (f", {num_server_test} examples" if num_server_test else ""),
        "",
        "## Training",
        f"- strategy: `{settings.strategy}`" + (f" ({strategy_params})" if strategy_params else ""),
        f"- rounds: {len(trained)} of {settings.num_server_rounds}; clients sampled per round: "
        f"fraction-train {settings.fraction_train} (at least {settings.min_train_clients})",
        f"- local training: {settings.local_epochs} epochs of {settings.optimizer}, learning rate "
        f"{settings.learning_rate}, batch size {settings.batch_size}; seed {settings.seed}",
        "",
        "## Privacy",
        *privacy_lines(settings, history),
        "",
        "## Robustness",
        *robustness_lines(settings, history),
        "",
        f"## {metric.capitalize() if metric == 'accuracy' else f'Metric: `{metric}`'}",
        "| model | centralized (server test set) | federated (client test splits) |",
        "|---|---|---|",
        f"| Keras, final round | {_fmt(last.value('centralized', metric))} | {_fmt(last.value('federated', metric))} |",
    ]
    if best is not None and best.round != last.round:
        lines.append(
            f"| Keras, best round ({best.round}) | {_fmt(best.value('centralized', metric))} | "
            f"{_fmt(best.value('federated', metric))} |"
        )
    if export_report:
        checked = export_report.get("metric", metric)
        for name, entry in export_report.get("models", {}).items():
            keras = entry.get("keras", {})
            if f"federated_{checked}" in keras:
                lines.append(
                    f"| Keras, {name} (export-check round clients) | "
                    f"{_fmt(keras.get(f'centralized_{checked}'))} | {_fmt(keras[f'federated_{checked}'])} |"
                )
            for variant, result in entry.get("tflite", {}).items():
                lines.append(
                    f"| TFLite {variant}, {name} (export-check round clients) | "
                    f"{_fmt(result.get(f'centralized_{checked}'))} | {_fmt(result.get(f'federated_{checked}'))} |"
                )
    others = [n for n in last.metric_names() if n != metric]
    if others:
        lines += [
            "",
            "Other metrics, final round (centralized / federated): "
            + "; ".join(
                f"`{n}` {_fmt(last.value('centralized', n))} / {_fmt(last.value('federated', n))}" for n in others
            ),
        ]
    lines += [
        "",
        "## Size",
        f"- parameters: {parameters:,}" if parameters is not None else "- parameters: –",
        f"- `model.keras`: {_size(keras_size)}",
    ]
    if export_report:
        for name, entry in export_report.get("models", {}).items():
            for variant, result in entry.get("tflite", {}).items():
                latency = result.get("latency_per_example", {}).get("median_seconds")
                lines.append(
                    f"- TFLite {variant} ({name}): {_size(result.get('size_bytes'))}"
                    + (
                        f", median latency {latency * 1e3:.3f} ms per example (one per invoke, server CPU)"
                        if latency is not None
                        else ""
                    )
                )
        lines += ["", "## Export check"]
        status = "**ready to ship**" if export_report.get("ready") else "**NOT ready**"
        checked = export_report.get("metric", "accuracy")
        direction = "relative rise of" if lower_is_better(checked) else "below Keras in"
        lines.append(f"- {status} (tolerance {export_report.get('tolerance')} {direction} `{checked}`)")
        lines.extend(f"- {reason}" for reason in export_report.get("reasons", []))
        selection = export_report.get("federated_check", {}).get("selection")
        if selection:
            lines.append(f"- federated check clients: {selection}")
    return "\n".join(lines) + "\n"
