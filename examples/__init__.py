"""Bring-your-own-model examples: a model module and a data module each, outside ``fl_app``."""
