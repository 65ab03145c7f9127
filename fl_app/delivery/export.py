"""Export of a trained global model for on-device inference: Keras, SavedModel, TFLite.

* ``keras``: the ``.keras`` archive (architecture + weights), for Keras/TensorFlow hosts;
* ``savedmodel``: a TensorFlow SavedModel directory with a ``serving_default`` signature, for
  TF Serving, TF.js and other converters;
* ``tflite``: TensorFlow Lite flatbuffers for phones and IoT devices, in two variants:

  - ``float32``: the same arithmetic as Keras (``TFLiteConverter.from_keras_model``);
  - ``int8``: full-integer post-training quantisation (Jacob et al. 2018, "Quantization and
    Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"): weights per
    channel and activations per tensor as ``x ≈ scale * (q - zero_point)`` with int8 ``q``; the
    activation ranges are calibrated on a *representative sample* of inputs (here: the server's
    held-out data), and input and output are int8 too, so that integer-only accelerators
    (Edge TPU, microcontrollers) can run the whole graph. About 4x smaller than float32.

Every function takes a Keras 2 (``tf_keras``) model; ``fl_app`` sets ``TF_USE_LEGACY_KERAS=1``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

import fl_app  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from fl_app.config.choices import TFLITE_TYPES


class ExportError(RuntimeError):
    """A model that could not be converted; the message names the format and the cause."""


def to_tflite(model, variant: str = "float32", representative: np.ndarray | None = None) -> bytes:
    """The model as a TFLite flatbuffer: ``float32``, or ``int8`` calibrated on ``representative``.

    ``representative`` holds example inputs (rows like the model's input, float32); the converter
    runs them one by one through the float model to record every activation's range.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "int8":
        if representative is None or len(representative) == 0:
            raise ExportError("int8 quantisation needs a representative sample of inputs (none given)")
        sample = np.asarray(representative, dtype=np.float32).reshape((-1, *model.input_shape[1:]))

        def calibration():
            for row in sample:
                yield [row[np.newaxis]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif variant != "float32":
        raise ValueError(f"TFLite variant must be one of {', '.join(TFLITE_TYPES)}; got '{variant}'")
    try:
        return bytes(converter.convert())
    except Exception as err:  # the converter raises many kinds (ConverterError, ValueError, ...)
        raise ExportError(f"TFLite {variant} conversion failed: {err}") from err


def save_savedmodel(model, directory: Path) -> Path:
    """A SavedModel directory (``serving_default`` signature) for TF Serving and converters."""
    import tensorflow as tf

    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    try:
        tf.saved_model.save(model, str(directory))
    except Exception as err:
        raise ExportError(f"SavedModel export failed: {err}") from err
    return directory


@dataclasses.dataclass
class ExportedModel:
    """What was written for one model (``final`` or ``best``): paths, sizes, TFLite bytes, errors."""

    name: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    tflite: dict[str, bytes] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> dict:
        return {"files": self.files, "size_bytes": self.sizes, "errors": self.errors}


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def export_model(
    model,
    name: str,
    directory: Path,
    formats: tuple[str, ...],
    tflite_types: tuple[str, ...],
    representative: np.ndarray | None,
) -> ExportedModel:
    """Write ``model`` in every requested format into ``directory`` as ``<name>.keras``,
    ``<name>_savedmodel/``, ``<name>_float32.tflite``, ``<name>_int8.tflite``.

    A format that fails is recorded in ``errors`` and the others go on: one failed conversion
    never loses the model or the other files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    result = ExportedModel(name)
    if "keras" in formats:
        path = directory / f"{name}.keras"
        try:
            model.save(path)
            result.files["keras"], result.sizes["keras"] = str(path), path.stat().st_size
        except Exception as err:
            result.errors.append(f"keras export failed: {err}")
    if "savedmodel" in formats:
        try:
            path = save_savedmodel(model, directory / f"{name}_savedmodel")
            result.files["savedmodel"], result.sizes["savedmodel"] = str(path), directory_size(path)
        except ExportError as err:
            result.errors.append(str(err))
    if "tflite" in formats:
        for variant in tflite_types:
            try:
                blob = to_tflite(model, variant, representative)
            except ExportError as err:
                result.errors.append(str(err))
                continue
            path = directory / f"{name}_{variant}.tflite"
            path.write_bytes(blob)
            result.tflite[variant] = blob
            result.files[f"tflite-{variant}"], result.sizes[f"tflite-{variant}"] = str(path), len(blob)
    return result
