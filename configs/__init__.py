"""Shipped config presets, installed as package data ``pipeline.configs`` (see setup.py).

This file only makes the folder importable in an editable install, so that
``importlib.resources.files("pipeline.configs")`` finds the presets in a checkout as in a wheel.
"""
