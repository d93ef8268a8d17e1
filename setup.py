"""The two files pyproject.toml cannot declare; everything else is there.

* ``megatron-dsv3.pth``, the start-up hook that wires ``--spec dsv3`` into unmodified Megatron-LM
  (see ``_megatron_dsv3_hook.py``), goes into the wheel's root: setuptools has no declarative way
  to ship a ``.pth`` file.  Editable installs (``pip install -e``) do not carry it: run
  ``megatron-dsv3 hook install``.
* The shipped recipes (top-level ``recipes/*.yaml``) go into the wheel as
  ``megatron_dsv3/shipped_recipes/`` (package data outside the package folder cannot be declared);
  a source checkout reads ``recipes/`` directly.
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "megatron-dsv3.pth"
RECIPES = os.path.join("megatron_dsv3", "shipped_recipes")


def _extra_files():
    """``{path in the wheel: source path}`` for the files pyproject.toml cannot declare."""
    files = {PTH: PTH}
    for recipe in sorted(glob.glob(os.path.join("recipes", "*.yaml"))):
        files[os.path.join(RECIPES, os.path.basename(recipe))] = recipe
    return files


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        for target, source in _extra_files().items():
            self.mkpath(os.path.dirname(os.path.join(self.build_lib, target)) or self.build_lib)
            self.copy_file(source, os.path.join(self.build_lib, target), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        extra = [os.path.join(self.build_lib, target) for target in _extra_files()]
        return list(super().get_outputs(include_bytecode)) + extra

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        for target, source in _extra_files().items():
            mapping[os.path.join(self.build_lib, target)] = source
        return mapping


setup(cmdclass={"build_py": build_py_with_pth})
