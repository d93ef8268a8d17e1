"""Recipes: a preset plus parallel layout, training hyper-parameters and data, as YAML.

* :func:`load_recipe` reads a YAML file or a shipped recipe by name (:func:`shipped_recipes`);
* :func:`megatron_dsv3.args.compose.recipe_argv` gives the argument list for stock ``pretrain_gpt.py``;
* :func:`recipe_report` validates a recipe at a world size and estimates its memory per GPU
  (:func:`estimate_memory`).

The schema, the key-to-flag mapping and the memory model are documented in ``docs/recipes.md``.
"""

from megatron_dsv3.recipe.check import validate_recipe
from megatron_dsv3.recipe.loader import load_recipe, loads_recipe, shipped_recipes
from megatron_dsv3.recipe.memory import MemoryEstimate, estimate_memory
from megatron_dsv3.recipe.report import CheckReport, recipe_report
from megatron_dsv3.recipe.schema import Recipe
from megatron_dsv3.recipe.sizes import parallel_layout

__all__ = [
    "CheckReport",
    "MemoryEstimate",
    "Recipe",
    "recipe_report",
    "estimate_memory",
    "load_recipe",
    "loads_recipe",
    "parallel_layout",
    "shipped_recipes",
    "validate_recipe",
]
