"""Packaging glue that pyproject.toml cannot express: the shipped checkpoint rides inside the package.

The model lives once in git, in the top-level checkpoints/ (beside its model card). Every build that
makes a wheel (`pip install .`, `pip install git+URL`, `pip wheel`, `python -m build`, also from the
sdist, which carries checkpoints/ through MANIFEST.in) copies it to captioner/_checkpoints/ inside the
package, where `captioner.checkpoint.default_checkpoint_path()` finds it from any working directory.
An editable install copies nothing: there the repository's checkpoints/ folder is found directly.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join("checkpoints", "flickr8k-cocotext-lite0")  # the source, relative to this file
FILES = ("model.safetensors", "MODEL_CARD.md")
PACKAGED = os.path.join("captioner", "_checkpoints", "flickr8k-cocotext-lite0")  # the destination inside the package


class build_py_with_checkpoint(build_py):  # noqa: N801 (setuptools' command naming)
    def _checkpoint_files(self) -> list[tuple[str, str]]:
        return [(os.path.join(HERE, SHIPPED, name), os.path.join(self.build_lib, PACKAGED, name)) for name in FILES]

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for source, target in self._checkpoint_files():
            if not os.path.isfile(source):  # a wheel without its model is the bug this step exists to prevent
                raise FileNotFoundError(f"{source}: the shipped checkpoint is missing, so the package would have "
                                        "no model; build from a full checkout or sdist")
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + [target for _, target in self._checkpoint_files()]


setup(cmdclass={"build_py": build_py_with_checkpoint})
