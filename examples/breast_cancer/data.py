"""The user's own data loader: ``load() -> (x, y)``, the whole pool, which the app partitions."""

from __future__ import annotations

import numpy as np


def load() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled breast-cancer data (no download): 569 x 30 standardised features,
    labels 0 (malignant) / 1 (benign)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x, data.target.astype(np.int64)
