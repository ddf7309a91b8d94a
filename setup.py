"""Packaging: setup.cfg holds the metadata; this adds the bundles to the wheel.

The bundles live at the top of the source tree (``bundles/<name>/``: configs, docs, LICENSE, benchmark.json),
where ``python -m monai.bundle run`` and the model zoo expect them. An installed (non-editable) medssl has no
source tree, so the build copies them into the package as ``medssl/_bundles/<name>/``, which
:func:`medssl.bundles.bundles_dir` finds there (weights, evaluation outputs and run folders are left out).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
LEFT_OUT = shutil.ignore_patterns("models", "eval", "runs", "logs", "__pycache__", "*.pt", "*.ts", "*.pyc")


class BuildPyWithBundles(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads bundles/ in the checkout
            return
        target = Path(self.build_lib) / "medssl" / "_bundles"
        for bundle in sorted(p for p in (HERE / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file()):
            shutil.copytree(bundle, target / bundle.name, ignore=LEFT_OUT, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithBundles})
