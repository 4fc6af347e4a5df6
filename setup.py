"""Build the Cython extensions and the built-in default guest.

Every ``hyperpy/_fast/*.pyx`` becomes an extension.  The built-in guest (``builtin:hello``) is
compiled from ``tests/guests`` with gcc during the build and shipped inside the wheel, so a user
who only ran ``pip install`` can boot it without a compiler.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

from Cython.Build import cythonize

ROOT = Path(__file__).resolve().parent
BUILTIN_GUESTS = ["hello"]


def _load_guest_builder():
    path = ROOT / "tests" / "guests" / "build.py"
    spec = importlib.util.spec_from_file_location("hyperpy_guest_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithGuests(build_py):
    """build_py that first compiles the built-in guests into hyperpy/guests/."""

    def run(self):
        if (ROOT / "tests" / "guests" / "build.py").exists():
            builder = _load_guest_builder()
            for name in BUILTIN_GUESTS:
                builder.build_guest(name, ROOT / "hyperpy" / "guests")
        super().run()


extensions = [
    Extension(f"hyperpy._fast.{p.stem}", [str(p.relative_to(ROOT))],
              extra_compile_args=["-O2", "-Wno-unused-function"])
    for p in sorted((ROOT / "hyperpy" / "_fast").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"embedsignature": True}),
    cmdclass={"build_py": BuildPyWithGuests},
)
