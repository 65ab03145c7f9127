"""What a model must predict: the task, read from the targets, and what follows from it.

A data set's targets ``y`` decide the task (unless the run config's ``task`` names it):

* ``multiclass``: one integer class per example (``y`` of shape ``(n,)``), or one-hot rows
  (``(n, k)`` of 0/1 summing to 1);
* ``binary``: integer labels 0/1 only (a model may end in one sigmoid unit or two softmax units);
* ``multilabel``: rows of 0/1 that do not sum to 1 (``(n, k)``, several labels per example);
* ``regression``: any other numbers (``(n,)`` or ``(n, k)`` targets);
* ``multioutput``: several targets per example, one per model output (a structured array, see
  :mod:`fl_app.task.targets`), each inferred as above (:attr:`OutputSpec.outputs`).

:class:`OutputSpec` is what a user's model factory receives besides the input shape. From it and
the model's output width come the loss and metrics of a model that its author left uncompiled
(:func:`default_loss`, :func:`default_metrics`). No TensorFlow is imported at module level: the
server uses the metric helpers without it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fl_app.config.choices import TASK_CHOICES, TASKS

MULTI_OUTPUT = "multioutput"
"""The task of a model with several outputs, each with its own task (never a run-config ``task``)."""

_LOWER_IS_BETTER = ("loss", "error", "crossentropy", "hinge", "divergence", "poisson", "logcosh")
_LOWER_IS_BETTER_NAMES = frozenset({"mae", "mse", "rmse", "mape", "msle", "kld", "kl_divergence"})


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The task and the shape of its targets.

    Attributes
    ----------
    task : one of :data:`TASKS`
    units : width of the output layer the task needs: the number of classes (``multiclass``),
        1 (``binary``), the number of labels (``multilabel``) or of targets (``regression``)
    num_classes : classes (``multiclass``; 2 for ``binary``), labels (``multilabel``), 0 (``regression``)
    one_hot : ``multiclass`` targets given as one-hot rows rather than integers
    outputs : ``multioutput`` only: ``(output name, its OutputSpec)`` per output, in the data's
        order (``units`` is then the number of outputs)
    """

    task: str
    units: int
    num_classes: int = 0
    one_hot: bool = False
    outputs: tuple[tuple[str, OutputSpec], ...] = ()

    def __post_init__(self) -> None:
        if self.task == MULTI_OUTPUT:
            if len(self.outputs) < 1 or self.units != len(self.outputs):
                raise ValueError("a multioutput spec needs one (name, OutputSpec) per output, units = their number")
            return
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got '{self.task}'")
        if self.units < 1:
            raise ValueError(f"an output needs at least one unit; got units={self.units} for task '{self.task}'")

    @property
    def classification(self) -> bool:
        return self.task != "regression"

    @property
    def multi_output(self) -> bool:
        return self.task == MULTI_OUTPUT

    @classmethod
    def classes(cls, num_classes: int) -> OutputSpec:
        """Integer labels in ``[0, num_classes)``: the built-in data sets' spec."""
        return cls("multiclass", int(num_classes), int(num_classes))


def infer_output_spec(y: np.ndarray, task: str = "auto", num_classes: int = 0) -> OutputSpec:
    """The :class:`OutputSpec` of targets ``y`` (see the module docstring).

    ``task`` other than ``auto`` overrides the inference (e.g. integer counts as ``regression``);
    ``num_classes`` > 0 fixes the number of classes where the labels might not show every class.
    Raises ``ValueError`` naming the key and what the targets allow.
    """
    if task not in TASK_CHOICES:
        raise ValueError(f"task must be one of {', '.join(TASK_CHOICES)}; got '{task}'")
    y = np.asarray(y)
    if y.dtype.names is not None:  # several targets: one spec per output (fl_app.task.targets)
        if task != "auto" or num_classes:
            raise ValueError(
                f"targets for several outputs ({', '.join(y.dtype.names)}) take their tasks from their own values: "
                "leave task='auto' and num-classes=0"
            )
        outputs = tuple((name, infer_output_spec(y[name])) for name in y.dtype.names)
        return OutputSpec(MULTI_OUTPUT, len(outputs), outputs=outputs)
    if len(y) == 0:
        raise ValueError("no targets to infer the task from")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        raise ValueError(f"targets must be numeric, got dtype {y.dtype}")
    values = y.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("targets hold NaN or infinite values")
    width = int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
    integral = bool(np.all(values == np.round(values)))
    zero_one = integral and bool(np.all((values == 0) | (values == 1)))
    if task == "auto":
        if y.ndim > 1 and width > 1 and zero_one:
            task = "multiclass" if np.all(values.reshape(len(y), -1).sum(axis=1) == 1) else "multilabel"
        elif width == 1 and integral and values.min() >= 0:
            task = "binary" if zero_one and num_classes <= 2 else "multiclass"
        else:
            task = "regression"
    if task == "regression":
        return OutputSpec("regression", width)
    if not integral or values.min() < 0:
        raise ValueError(f"task '{task}' needs integer (or 0/1) targets >= 0; these targets are real numbers")
    if task == "multilabel":
        if not zero_one or width < 2:
            raise ValueError("task 'multilabel' needs targets of shape (n, labels) holding 0 or 1")
        return OutputSpec("multilabel", width, width)
    if width > 1:  # one-hot rows
        if not zero_one or not np.all(values.reshape(len(y), -1).sum(axis=1) == 1):
            raise ValueError(f"task '{task}' with targets of shape {y.shape[1:]} needs one-hot rows (0/1 summing to 1)")
        return OutputSpec("multiclass", width, width, one_hot=True)
    classes = max(int(num_classes), int(values.max()) + 1)
    if task == "binary":
        if classes > 2:
            raise ValueError(f"task 'binary' needs labels 0 and 1; found {classes} classes (num-classes or the labels)")
        return OutputSpec("binary", 1, 2)
    return OutputSpec("multiclass", max(classes, 2), max(classes, 2))


def strata(y: np.ndarray, spec: OutputSpec, bins: int = 10) -> np.ndarray:
    """One integer per example to stratify and partition by: the class (multiclass, binary), the
    first label (multilabel) or the target's quantile bin (regression, first target)."""
    y = np.asarray(y)
    if spec.multi_output:  # the first output's strata
        name, first_spec = spec.outputs[0]
        return strata(y[name], first_spec, bins)
    if spec.task == "regression":
        first = y.reshape(len(y), -1)[:, 0].astype(np.float64)
        edges = np.unique(np.quantile(first, np.linspace(0, 1, bins + 1)[1:-1]))
        return np.searchsorted(edges, first, side="right").astype(np.int64)
    if spec.task == "multilabel":
        return y.reshape(len(y), -1)[:, 0].astype(np.int64)
    if spec.one_hot:
        return np.argmax(y.reshape(len(y), -1), axis=1).astype(np.int64)
    return y.reshape(-1).astype(np.int64)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the Keras metric named ``metric`` is better (losses, errors)."""
    name = metric.lower()
    return name in _LOWER_IS_BETTER_NAMES or any(part in name for part in _LOWER_IS_BETTER)


def headline_metric(names: list[str] | tuple[str, ...]) -> str | None:
    """The metric a run is summed up by: ``accuracy`` if reported, else the first non-loss one."""
    if "accuracy" in names:
        return "accuracy"
    # a multi-output model also reports each output's loss (``<output>_loss``): not a metric
    return next((n for n in names if n != "loss" and not n.endswith("_loss")), None)
