"""scripts/compare_checkouts.py's side parsing: nothing started."""

from __future__ import annotations

import argparse
import sys

import pytest

from tests.helpers import ROOT, load_script


def test_a_side_names_a_checkout_with_a_venv_and_its_options():
    script = load_script("compare_checkouts")
    name, root, options = script.parse_side(f"new-ray={ROOT}:--backend ray --cpus-per-client 1")
    assert (name, root, options) == ("new-ray", ROOT.resolve(), ["--backend", "ray", "--cpus-per-client", "1"])
    assert script.parse_side(f"new={ROOT}")[2] == []
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=PATH"):
        script.parse_side(str(ROOT))
    with pytest.raises(argparse.ArgumentTypeError, match="fl-keras-run does not exist"):
        script.parse_side(f"old={ROOT / 'docs'}")
    assert sys.modules["compare_checkouts"] is script
