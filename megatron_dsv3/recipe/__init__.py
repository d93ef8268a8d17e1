"""Recipes: a preset plus parallel layout, training hyper-parameters and data, as YAML."""
