"""Build of tbt's optional native kernels (metadata lives in pyproject.toml).

``tbt/runtime/csrc/*.c`` is compiled into one shared library,
``tbt/runtime/_tbt_kernels<ext-suffix>``. It is a plain C library loaded with ctypes, not a
Python extension module, so it needs no Python or torch headers. The extension is optional: if
there is no C compiler, or the build fails, tbt still installs and the runtime falls back to the
numpy reference kernels. No ``-march`` flag is passed: SIMD paths carry their own
``__attribute__((target))`` and are chosen at run time.

Threads: the library's own pthread pool (``csrc/tbt_kernels.c`` explains why: an OpenMP team
barrier stalled whole scheduler quanta on a shared machine, and a second OpenMP runtime next to
torch's made it worse). ``TBT_OPENMP=1`` builds the OpenMP variant instead, when ``-fopenmp``
compiles and links.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("src/tbt/runtime/csrc")
SOURCES = sorted(str(p.as_posix()) for p in CSRC.glob("*.c"))
CFLAGS = ["-std=c11", "-O2", "-ffp-contract=off", "-fvisibility=hidden", "-Wall"]

_OMP_PROBE = "#include <omp.h>\nint tbt_probe(void) { return omp_get_max_threads(); }\n"


class BuildKernels(build_ext):
    """build_ext that picks portable flags and probes for OpenMP."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags, link = ["/O2"], []
        else:
            flags, link = list(CFLAGS), []
            if os.environ.get("TBT_OPENMP") == "1" and self._links(["-fopenmp"]):
                flags.append("-fopenmp")
                link.append("-fopenmp")
            else:
                flags.append("-pthread")
                link.append("-pthread")
        for ext in self.extensions:
            ext.extra_compile_args = flags
            ext.extra_link_args = link
        super().build_extensions()

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library: no PyInit_ symbol to export

    def _links(self, flags: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp, "probe.c")
            src.write_text(_OMP_PROBE)
            try:
                objs = self.compiler.compile([str(src)], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_shared_object(objs, str(Path(tmp, "probe.so")),
                                                 extra_postargs=flags)
            except Exception:  # noqa: BLE001 -- any failure means "no OpenMP"
                return False
        return True


setup(
    ext_modules=[Extension("tbt.runtime._tbt_kernels", sources=SOURCES,
                           depends=[str(p.as_posix()) for p in CSRC.glob("*.h")],
                           optional=True),
                 # training-time fused activation quantizers (tbt/quant/fused.py), also ctypes
                 Extension("tbt.quant._tbt_qops", sources=["src/tbt/quant/csrc/qops.c"],
                           optional=True)],
    cmdclass={"build_ext": BuildKernels},
)
