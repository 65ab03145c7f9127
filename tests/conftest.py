"""Shared fixtures. TensorFlow runs single-threaded and quietly in tests."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: on a shared 2-core machine a TensorFlow-heavy example can take seconds.
# CI (``.ci/run`` sets HYPOTHESIS_PROFILE=ci) also derandomizes, so that its run is reproducible.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT
