"""Build script: the Python packages plus the Cython extensions whose sources live in ext/.

The compiled modules are installed as ``soci_fs._ext.<name>``; each has a pure-Python twin in ``soci_fs``
and ``SOCI_PUREPYTHON=1`` selects the twin at import time (see ``soci_fs/_select.py``).
"""

from __future__ import annotations

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O3"]

extensions = [
    Extension(
        "soci_fs._ext._zinfo",
        sources=["ext/_zinfo.pyx"],
        libraries=["z", "isal"],
        define_macros=[("ZLIB_CONST", None)],
        extra_compile_args=COMPILE_ARGS,
    ),
    Extension("soci_fs._ext._tarscan", sources=["ext/_tarscan.pyx"], extra_compile_args=COMPILE_ARGS),
    Extension("soci_fs._ext._blockcopy", sources=["ext/_blockcopy.pyx"], extra_compile_args=COMPILE_ARGS),
    Extension("soci_fs._ext._ztocwrite", sources=["ext/_ztocwrite.pyx"], extra_compile_args=COMPILE_ARGS),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
