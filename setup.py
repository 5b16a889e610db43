"""Installs `longctx_lmeval.pth` next to the package (wheels and editable installs alike), so
the stock `lm_eval` command knows `--model ssmlora` (see longctx/lmeval/plugin.py). Everything
else about the package is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "longctx_lmeval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        shutil.copy(PTH, Path(self.build_lib) / PTH.name)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copy(PTH, Path(unpacked_wheel) / PTH.name)
        return files, mapping


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
