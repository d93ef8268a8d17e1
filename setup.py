"""Installs ``megatron-dsv3.pth`` next to the package: the start-up hook that wires ``--spec dsv3``
into unmodified Megatron-LM (see ``_megatron_dsv3_hook.py``).  Everything else is in pyproject.toml.

setuptools has no declarative way to ship a ``.pth`` file, so ``build_py`` copies it into the wheel's
root.  Editable installs (``pip install -e``) do not carry it: run ``megatron-dsv3 hook install``.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "megatron-dsv3.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[os.path.join(self.build_lib, PTH)] = PTH
        return mapping


setup(cmdclass={"build_py": build_py_with_pth})
