"""Build of fqkernels' compiled modules through CMake.

    pip install --no-build-isolation -e .      # uses the already installed torch, pybind11, cmake

Environment:
    FQ_BUILD_CUDA=0|1   force the CUDA module off/on (default: on when nvcc is found)
    FQ_CUDA_ARCHS       CMake CUDA architectures (default "80;90")
    FQ_BUILD_DIR        CMake build directory (default build/cmake)
    MAX_JOBS            parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cuda_wanted():
    flag = os.environ.get("FQ_BUILD_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ValueError(f"FQ_BUILD_CUDA: expected 0 or 1, got {flag!r}")
    return shutil.which("nvcc") is not None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds every module with one CMake run, into the package dir."""

    def run(self):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_dir = Path(os.environ.get("FQ_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        use_cuda = cuda_wanted()
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFQ_OUTPUT_DIR={out_dir}",
            f"-DFQ_BUILD_CUDA={'ON' if use_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if use_cuda:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('FQ_CUDA_ARCHS', '80;90')}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])
        if not use_cuda:
            # A stale _cuda module from an earlier build would be imported as current.
            for stale in out_dir.glob("_cuda*.so"):
                stale.unlink()


setup(
    name="fqdetr",
    version="0.1.0",
    description="Custom-kernel quantization engine and Fisher-aware quantization for DETR detectors",
    packages=find_packages(include=["fqkernels", "fqkernels.*", "fqdetr", "fqdetr.*"]),
    # The shipped checkpoints (fqdetr/shipped_models links to models/), so that the commands'
    # default --model works after a plain 'pip install .' too.
    package_data={"fqdetr": ["shipped_models/*.pth"]},
    ext_modules=[CMakeExtension("fqkernels._cpu")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # Ranges, not pins: the GPU image (torch 2.11, triton 3.6) must satisfy them as it is.
    # The CPU pins live in the Makefile's set-up.
    install_requires=["torch>=2.4", "numpy", "scipy", "pycocotools", "pillow", "tqdm", "pyyaml", "matplotlib"],
    extras_require={"triton": ["triton>=3.0"], "bench": ["opacus", "pytest-benchmark"],
                    # fqdetr.export: ONNX export and onnxruntime (the Makefile pins onnx==1.23.2, onnxruntime==1.32.0)
                    "deploy": ["onnx>=1.23", "onnxruntime>=1.32"]},
    entry_points={"console_scripts": ["fqdetr=fqdetr.cli:main"]},
    zip_safe=False,
)
