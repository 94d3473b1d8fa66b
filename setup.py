"""Builds the native agent (agent/*.c) into src/tally/libtally_agent.so.

The agent is a plain C shared library loaded by the CUDA driver through
CUDA_INJECTION64_PATH, not a Python extension: it links against nothing but
libc/libdl/libpthread and loads libcuda and libcupti at run time, so it builds
on a machine with no GPU and no CUDA toolkit. setuptools' build_ext is reused
only for its compiler handling; the output name is fixed and carries no Python
ABI tag.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

AGENT = "tally.libtally_agent"


class BuildAgent(build_ext):
    def get_ext_filename(self, fullname):
        # Called with the dotted name and, by distutils, with its last part alone.
        if fullname in (AGENT, AGENT.rpartition(".")[2]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):
        # No PyInit_* symbol: this is not an importable module.
        return ext.export_symbols

    def get_libraries(self, ext):
        return ext.libraries


setup(
    ext_modules=[
        Extension(
            AGENT,
            sources=["agent/tally_agent.c", "agent/sched.c", "agent/runahead.c", "agent/gpugate.c", "agent/gate.c", "agent/profiles.c",
                     "agent/modules.c", "agent/blocksched.c"],
            include_dirs=["agent"],
            depends=["agent/agent.h", "agent/cuda_decls.h", "agent/gate.h", "agent/scoreboard.h",
                     "agent/sched_internal.h"],
            libraries=["dl", "pthread"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-format-truncation", "-fvisibility=hidden"],
        )
    ],
    cmdclass={"build_ext": BuildAgent},
)
