"""Build script: maps ``kernels/`` to ``tfz.kernels`` and builds the optional native extensions, the
timer ``tfz._C``, the plan solver ``tfz.plan._sidesimplex`` and the row-freezing AdamW step
``tfz._row_adamw``.

Set ``TFZ_SKIP_CPP_BUILD=1`` to skip the native build; without a working C++ compiler the build is
skipped with a warning and tfz falls back to Python timing, the HiGHS plan solver and optimizer hooks.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 missing: no native build
    Pybind11Extension = None


FALLBACK = {
    "tfz._C": "Python timing",
    "tfz.plan._sidesimplex": "the HiGHS plan solver",
    "tfz._row_adamw": "row-freezing hooks around torch's optimizer step",
}
"""What each native extension falls back to when it is not built."""


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install when the toolchain is missing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no native build"
            _warn("tfz native extensions", exc, " and ".join(FALLBACK.values()))

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _warn(ext.name, exc, FALLBACK[ext.name])


def _warn(what, exc, fallback):
    print(f"WARNING: {what} not built ({exc}); {fallback} will be used", file=sys.stderr)


def _native(name, source, flags=("-O2",), **kwargs):
    return Pybind11Extension(name, sources=[source], cxx_std=17, extra_compile_args=list(flags), **kwargs)


VECTORISED = ("-O3", "-fno-math-errno", "-ffp-contract=off")
"""Flags of the row-AdamW pass: vectorised sqrt, and no contraction, so it rounds as torch's AdamW does."""

ext_modules = []
if Pybind11Extension is not None and os.environ.get("TFZ_SKIP_CPP_BUILD", "0") != "1":
    ext_modules = [
        _native("tfz._C", "csrc/timer.cpp", libraries=["dl"]),
        _native("tfz.plan._sidesimplex", "csrc/sidesimplex.cpp"),
        _native("tfz._row_adamw", "csrc/row_adamw.cpp", flags=VECTORISED),
    ]

packages = find_packages(include=["tfz", "tfz.*"]) + ["tfz.kernels"]

setup(
    packages=packages,
    package_dir={"tfz": "tfz", "tfz.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
