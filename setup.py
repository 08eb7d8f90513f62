"""Builds the native extension `engine._native` from csrc/ with CMake (C++17, -O3).

The pure-Python parts are described in pyproject.toml; this file only adds the CMake step.
Set ENGINE_BUILD_TYPE=Debug / ENGINE_SANITIZE=1 for debug / ASan+UBSan builds.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = ".") -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(Path(source_dir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("ENGINE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DENGINE_SANITIZE={'ON' if os.environ.get('ENGINE_SANITIZE') == '1' else 'OFF'}",
        ]
        try:
            import ninja  # noqa: F401  (pip-installed ninja puts the binary on PATH)
            args.append("-GNinja")
        except ImportError:
            pass
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.source_dir, *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("engine._native")], cmdclass={"build_ext": CMakeBuild})
