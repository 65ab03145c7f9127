"""TFLite inference with the interpreter only: no Keras, no model code, just the ``.tflite`` bytes.

This module needs nothing but numpy and a TFLite interpreter, found in this order:
``ai_edge_litert`` (Google's LiteRT package, the interpreter's home since TF 2.20),
``tflite_runtime`` (the older standalone wheel), then ``tensorflow.lite`` (the full TensorFlow).
It imports nothing else from this project, so it is what a device needs besides the model file
(``scripts/tflite_predict.py`` is its command-line face).

Quantised models are handled from the tensors' own quantisation parameters: an int8/uint8 input
is fed ``q = round(x / scale) + zero_point`` (clipped to the type's range) and an integer output is
read back as ``x = scale * (q - zero_point)``, so callers always pass and receive float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np


def load_interpreter_class() -> tuple[type, str]:
    """The first TFLite ``Interpreter`` class available, and the name of the package it came from."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    from tensorflow.lite.python.interpreter import Interpreter

    return Interpreter, "tensorflow.lite"


def quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float input → the tensor's dtype (affine quantisation when the tensor is an integer type)."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.asarray(x, dtype=dtype)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        raise ValueError(f"input tensor {detail['name']} is {dtype} but has no quantisation scale")
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Integer output → float32 (``scale * (q - zero_point)``); float outputs pass through."""
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return np.asarray(q, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    return (scale * (q.astype(np.float32) - zero_point)).astype(np.float32)


class TFLitePredictor:
    """Batched prediction and per-example latency of one ``.tflite`` model (one input, one output)."""

    def __init__(self, model_content: bytes, num_threads: int = 1) -> None:
        if not model_content:
            raise ValueError("the TFLite model is empty")
        self.model_content = bytes(model_content)
        self.num_threads = num_threads
        self.interpreter_class, self.interpreter_package = load_interpreter_class()
        self._interpreter = self._new_interpreter()
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input_detail, self.output_detail = inputs[0], outputs[0]
        self._batch = int(self.input_detail["shape"][0])

    @classmethod
    def from_file(cls, path, num_threads: int = 1) -> TFLitePredictor:
        with open(path, "rb") as handle:
            return cls(handle.read(), num_threads)

    def _new_interpreter(self):
        import warnings

        with warnings.catch_warnings():  # tf.lite.Interpreter: "deprecated, use ai_edge_litert"
            warnings.simplefilter("ignore")
            interpreter = self.interpreter_class(model_content=self.model_content, num_threads=self.num_threads)
        interpreter.allocate_tensors()
        return interpreter

    @property
    def size_bytes(self) -> int:
        return len(self.model_content)

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one example (the input's shape without the batch axis)."""
        return tuple(int(d) for d in self.input_detail["shape"][1:])

    @property
    def input_dtype(self) -> str:
        return np.dtype(self.input_detail["dtype"]).name

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            self._interpreter.resize_tensor_input(self.input_detail["index"], [batch, *self.example_shape])
            self._interpreter.allocate_tensors()
            self._batch = batch

    def _run(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        self._interpreter.set_tensor(self.input_detail["index"], quantize(x, self.input_detail))
        self._interpreter.invoke()
        return dequantize(self._interpreter.get_tensor(self.output_detail["index"]), self.output_detail)

    def _reshape(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if int(np.prod(x.shape[1:])) != int(np.prod(self.example_shape)):
            raise ValueError(f"examples of shape {x.shape[1:]} do not fit the model's input shape {self.example_shape}")
        return x.reshape((len(x), *self.example_shape))

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Output (e.g. class probabilities) for every row of ``x``, as float32."""
        x = self._reshape(x)
        if len(x) == 0:
            return np.empty((0, *self.output_detail["shape"][1:]), np.float32)
        return np.concatenate([self._run(chunk) for chunk in _chunks(x, batch_size)])

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
        """Top-1 accuracy on integer labels ``y``."""
        if len(y) == 0:
            raise ValueError("no examples to evaluate on")
        return float(np.mean(np.argmax(self.predict(x, batch_size), axis=-1) == np.asarray(y)))

    def latency(self, x: np.ndarray, repeats: int = 1, warmup: int = 3) -> dict[str, float]:
        """Seconds per example, one example per ``invoke()`` (as on a device): median, p90, mean."""
        x = self._reshape(x)
        if len(x) == 0:
            raise ValueError("no examples to time")
        for i in range(min(warmup, len(x))):
            self._run(x[i : i + 1])
        times = []
        for _ in range(repeats):
            for i in range(len(x)):
                started = time.perf_counter()
                self._run(x[i : i + 1])
                times.append(time.perf_counter() - started)
        seconds = np.asarray(times)
        return {
            "median_seconds": float(np.median(seconds)),
            "p90_seconds": float(np.percentile(seconds, 90)),
            "mean_seconds": float(np.mean(seconds)),
            "examples_timed": int(len(seconds)),
        }


def _chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), size):
        yield x[start : start + size]
