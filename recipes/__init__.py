"""Shipped recipes (installed as ``megatron_dsv3.shipped_recipes``); see ``docs/recipes.md``.

This file makes the folder a regular package: setuptools' editable install cannot import a
namespace package mapped inside a regular one (``megatron_dsv3``).
"""
