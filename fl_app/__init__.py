"""Flower apps that train Keras models on the devices that hold the data.

TensorFlow Privacy's Keras optimizers need Keras 2 (``tf_keras``), so the whole app uses
``tf.keras`` in its legacy flavour. The variable must be set before TensorFlow is first
imported, which is why it lives here, in the package's first module.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
