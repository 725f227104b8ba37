"""Build script: maps ``kernels/`` to ``tfz.kernels`` and builds the optional native timer ``tfz._C``.

Set ``TFZ_SKIP_CPP_BUILD=1`` to skip the native build; without a working C++ compiler the build is
skipped with a warning and tfz falls back to Python timing.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 missing: no native build
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install when the toolchain is missing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no native timer"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        print(f"WARNING: tfz native timer not built ({exc}); Python timing will be used", file=sys.stderr)


ext_modules = []
if Pybind11Extension is not None and os.environ.get("TFZ_SKIP_CPP_BUILD", "0") != "1":
    ext_modules.append(
        Pybind11Extension(
            "tfz._C",
            sources=["csrc/timer.cpp"],
            cxx_std=17,
            libraries=["dl"],
            extra_compile_args=["-O2"],
        )
    )

packages = find_packages(include=["tfz", "tfz.*"]) + ["tfz.kernels"]

setup(
    packages=packages,
    package_dir={"tfz": "tfz", "tfz.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
