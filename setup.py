"""Build script. Pure-Python install everywhere; the CUDA extension in csrc/ is built only when
torch with CUDA and nvcc are importable at build time, i.e. with `--no-build-isolation` (pip's
isolated build environment has no torch, and must not need one)."""
import glob
import os

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["maskdit_fast", "maskdit_fast.*"]) + ["maskdit_fast.kernels"]
PACKAGE_DIR = {"maskdit_fast.kernels": "kernels"}


def cuda_extension():
    """Returns (ext_modules, cmdclass) for csrc/, or ([], {}) with the reason printed."""
    if os.environ.get("MASKDIT_FAST_NO_CUDA_EXT") == "1":
        print("maskdit_fast: CUDA extension skipped (MASKDIT_FAST_NO_CUDA_EXT=1)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("maskdit_fast: CUDA extension skipped (torch not importable in the build environment; "
              "use `pip install --no-build-isolation -e .` to build it)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print(f"maskdit_fast: CUDA extension skipped (torch.version.cuda={torch.version.cuda}, "
              f"CUDA_HOME={CUDA_HOME})")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # A100, H100/H200; PTX for newer cards
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="maskdit_fast._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        # No -std flag: torch's extension helpers pick the C++ standard its headers need (C++20 on 2.14).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    print(f"maskdit_fast: building CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()
# The measured tables the kernels and "auto" read (kernels/tuned/*.json) ship with the package.
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data={"maskdit_fast.kernels": ["tuned/*.json"]},
      ext_modules=ext_modules, cmdclass=cmdclass)
