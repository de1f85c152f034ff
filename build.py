"""
Builds the sparse FFN kernels next to this file:
  _sparse_ffn_c     from sparse_ffn.c, kernels/sparse_ffn_tuned.c and decode.c with cffi (API mode): always tried;
                    -O3 -march=native -fopenmp,
                    retried without -march=native and/or without -fopenmp, saying so.
  _sparse_ffn_cuda  from sparse_ffn.cu with torch.utils.cpp_extension (setuptools build_ext --inplace):
                    only when torch has CUDA and nvcc is found; otherwise skipped with the reason.

    python build.py           # both, with a summary
    python build.py --c       # only the C kernel (also: build.build_c() / build.ensure_c() from Python)

Nothing is compiled at import time of sparse_ffn.py: run this once after a checkout or after editing
the kernels (ensure_c() rebuilds when any of C_SOURCES is newer than the built module).
"""

import os
import shutil
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(HERE, "build")

C_SOURCES = ("sparse_ffn.c", "sparse_ffn.h", "kernels/sparse_ffn_tuned.c", "kernels/sparse_ffn_simd.h",
             "kernels/sparse_ffn_x86.h", "decode.c", "decode.h")  # three units, the .c files; the .h files are included


def c_api():
    """The C API as cffi's cdef reads it: sparse_ffn.h's prototypes (between its API markers), then decode.h's
    declarations, each without the preprocessor lines: one text for the C files and for cffi."""
    with open(os.path.join(HERE, "sparse_ffn.h")) as f:
        kernels = f.read().split("// API begin")[1].split("\n", 1)[1].split("// API end")[0]
    with open(os.path.join(HERE, "decode.h")) as f:
        return kernels + "".join(line for line in f if not line.startswith("#"))


# the flag sets tried in order: the first that compiles wins
C_FLAG_SETS = [
    (["-O3", "-march=native", "-fopenmp"], ["-fopenmp"], ""),
    (["-O3", "-fopenmp"], ["-fopenmp"], "without -march=native (portable loops, no AVX2 intrinsics)"),
    (["-O3", "-march=native"], [], "without OpenMP: one thread"),
    (["-O3"], [], "without -march=native and without OpenMP: portable loops, one thread"),
]


def _built(name):
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = os.path.join(HERE, name + ext)
    return path if os.path.exists(path) else None


def c_is_stale():
    """True when the C module is missing or older than its sources (or this build script)."""
    so = _built("_sparse_ffn_c")
    if so is None:
        return True
    newest = max(os.path.getmtime(os.path.join(HERE, f)) for f in C_SOURCES + ("build.py",))
    return os.path.getmtime(so) < newest


def find_c_compiler():
    """$CC, else the compiler Python was built with, else cc / gcc / clang; None if there is none."""
    for cc in [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]:
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def build_c(verbose=False, flag_sets=None, name="_sparse_ffn_c", dest_dir=HERE):
    """Compile _sparse_ffn_c; returns (ok, message). Never raises for a failed compile.
    flag_sets, name, dest_dir: another build of the same source (the tests build the AVX2 and the
    portable paths this way, next to the native one), as its own module in dest_dir."""
    try:
        import cffi
    except ImportError:
        return False, "cffi is not installed (pip install cffi)"
    cc = find_c_compiler()
    if cc is None:
        return False, "no C compiler found (looked for $CC, cc, gcc, clang): install gcc or clang"
    if "CC" not in os.environ and cc != sysconfig.get_config_var("CC"):  # Python's own compiler is missing
        os.environ["CC"], os.environ["LDSHARED"] = cc, cc + " -shared"
    build_dir = BUILD_DIR if name == "_sparse_ffn_c" else os.path.join(dest_dir, "build_" + name)
    os.makedirs(build_dir, exist_ok=True)
    errors = []
    for cflags, ldflags, note in flag_sets or C_FLAG_SETS:
        ffi = cffi.FFI()
        ffi.cdef(c_api())
        ffi.set_source(name, '#include "sparse_ffn.h"\n#include "decode.h"\n', sources=[os.path.join(HERE, f) for f in C_SOURCES
                                                                     if f.endswith(".c")],
                       include_dirs=[HERE, os.path.join(HERE, "kernels")], extra_compile_args=cflags, extra_link_args=ldflags, libraries=["m"])
        try:
            # cffi's output is the compiler's; keep it quiet unless asked, a failed try is retried
            so = _quiet(lambda: ffi.compile(tmpdir=build_dir, verbose=verbose), verbose)
        except Exception as e:  # cffi.VerificationError, distutils/setuptools CompileError, ...
            errors.append(f"{' '.join(cflags)}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
            continue
        dest = os.path.join(dest_dir, os.path.basename(so))
        shutil.copy2(so, dest + ".tmp")
        os.replace(dest + ".tmp", dest)  # atomic: another process never imports half a module
        flags = " ".join(cflags + [f for f in ldflags if f not in cflags])
        return True, f"built {os.path.basename(dest)} ({flags})" + (f"; note: built {note}" if note else "")
    return False, "C kernel failed to compile with every flag set:\n  " + "\n  ".join(errors)


def _quiet(fn, verbose):
    """Run fn with stdout/stderr (the fds, compilers write there) sent to a log file unless verbose."""
    if verbose:
        return fn()
    os.makedirs(BUILD_DIR, exist_ok=True)
    log = os.path.join(BUILD_DIR, "build.log")
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1); os.dup2(f.fileno(), 2)
        try:
            return fn()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])


def ensure_c(verbose=False):
    """Build the C module if it is missing or stale; returns (ok, message)."""
    if not c_is_stale():
        return True, "up to date"
    return build_c(verbose)


def build_cuda(verbose=False):
    """Compile _sparse_ffn_cuda with torch's BuildExtension; returns (ok or None if skipped, message)."""
    src = os.path.join(HERE, "sparse_ffn.cu")
    if not os.path.exists(src):
        return None, "sparse_ffn.cu not found"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return None, f"cannot import torch ({e})"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if cpp_extension.CUDA_HOME is None or not shutil.which(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return None, "nvcc not found (set CUDA_HOME)"
    from setuptools import setup
    ext = cpp_extension.CUDAExtension("_sparse_ffn_cuda", ["sparse_ffn.cu"], depends=["kernels/sparse_ffn_kernels.cuh"],
                                      extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    cwd = os.getcwd()
    os.chdir(HERE)  # setuptools wants relative sources; --inplace puts the module here
    try:
        _quiet(lambda: setup(name="_sparse_ffn_cuda", ext_modules=[ext], script_args=[
            "build_ext", "--inplace", "--build-temp", os.path.join("build", "cuda")],
            cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}), verbose)
    except (Exception, SystemExit) as e:
        return False, f"CUDA extension failed to compile ({type(e).__name__}: {e}); see build/build.log"
    finally:
        os.chdir(cwd)
    so = _built("_sparse_ffn_cuda")
    return (True, f"built {os.path.basename(so)}") if so else (False, "CUDA build produced no module")


def main():
    unknown = [a for a in sys.argv[1:] if a not in ("-v", "--verbose", "--c")]
    if unknown:
        sys.exit(f"usage: python build.py [-v|--verbose] [--c (the C kernel only)]; unknown: {' '.join(unknown)}")
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    results = [("C kernel (_sparse_ffn_c)", build_c(verbose))]
    if "--c" not in sys.argv:
        results.append(("CUDA kernel (_sparse_ffn_cuda)", build_cuda(verbose)))
    print("build summary:")
    for name, (ok, msg) in results:
        print(f"  {name}: {'OK' if ok else 'SKIPPED' if ok is None else 'FAILED'}: {msg}")
    if any(ok is False for _, (ok, _) in results):
        print("  (compiler output: build/build.log, or rerun with -v)")
        sys.exit(1)


if __name__ == "__main__":
    main()
