"""Build devmgr's native core (core/*.pyx -> devmgr._core, devmgr._loadgen).

The extensions do not link libzmq: at import they resolve its symbols from the very
library pyzmq has loaded (see core/_core.pyx), so one build survives pyzmq upgrades.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("devmgr._core", ["core/_core.pyx"], libraries=["dl"]),
    Extension("devmgr._loadgen", ["core/_loadgen.pyx"], libraries=["dl"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    ),
)
