"""The config's choice names equal the registries that implement them."""

from fl_app.attacks.catalogue import ATTACKS
from fl_app.config import choices


def test_attack_names_are_the_catalogue():
    assert set(choices.ATTACK_NAMES) == set(ATTACKS)


def test_model_names_are_the_model_registry():
    from fl_app.task.models import MODELS

    assert set(choices.MODEL_NAMES) == set(MODELS)
