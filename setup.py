"""Build of the rptq package and its compiled kernels (``rptq_cli._C``).

``pip install --no-build-isolation -e .`` (``make install``) compiles ``csrc/ops.cpp`` and ``csrc/cpu/*.cpp``
with OpenMP; the CPU kernels for AVX-512 VNNI, AVX2 and baseline x86-64 are all in the one build and
chosen at run time from the processor's flags. When torch has CUDA and ``nvcc`` is found, the
``csrc/cuda/*.cu`` kernels are built in too (a CUDAExtension). ``RPTQ_NO_EXTENSION=1`` skips the
extension (the pure-PyTorch reference then runs).

``pip install .`` (not editable) installs the presets and big models' configs of ``rptq_cli/configs/`` with the
package (``package_data``), and the pinned runtime dependencies of ``requirements.txt``.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    if os.environ.get("RPTQ_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cuda_sources = rel("csrc/cuda/*.cu")
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and shutil.which("nvcc") is not None \
        and os.environ.get("RPTQ_NO_CUDA") != "1"
    # RPTQ_CUDA_ARCHS="90" builds for one architecture only (a faster build on a known GPU)
    archs = os.environ.get("RPTQ_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]
    if with_cuda:
        ext = CUDAExtension(
            "rptq_cli._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DRPTQ_WITH_CUDA"],
                                "nvcc": ["-O3", "-DRPTQ_WITH_CUDA", "--expt-relaxed-constexpr", *gencode]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("rptq_cli._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def requirements() -> list[str]:
    """requirements.txt without its comments: the runtime dependencies, one source for pip and make install."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


ext_modules, cmdclass = extensions()

setup(
    name="rptq",
    version="0.1.0",
    description="RPTQ quantization of LLMs with packed low-bit kernels",
    packages=find_packages(include=["rptq_cli", "rptq_cli.*"]),
    package_data={"rptq_cli": ["configs/*.yaml", "configs/models/*/config.json"]},
    python_requires=">=3.10",
    install_requires=requirements(),
    entry_points={"console_scripts": ["rptq = rptq_cli.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
