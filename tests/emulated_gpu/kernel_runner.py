"""Compile CUDA kernel sources for the CPU (with cuda_cpu.h and g++) and launch them through ctypes.

The emulated CuPy (tests/emulated_gpu/cupy) builds its RawModule on this, so the GPU backend's kernels
run in CI from the very source CuPy compiles on a GPU (cupynet/backends/kernels.module_source):

    module = CompiledModule(code, name_expressions=["relu_forward<float>", "bn_sums_finalize"])
    module.launch("relu_forward<float>", (grid, 1, 1), (256, 1, 1), 0, (x, y, numpy.int32(n), numpy.int32(1)))

Arguments are checked against the kernel's C++ parameter types before anything runs, the way a GPU
would silently misread them: arrays (anything with `.ctypes.data`) for pointer parameters, NumPy scalars
whose kind and size match the parameter exactly (numpy.int32 for int, numpy.float64 for double, ...).
A Python int or float is refused, because CuPy would pass it as a 64-bit value.

Three constructs of our sources have no C++ meaning and are rewritten before compiling, and only these:
`#include <cuda_bf16.h>` (cuda_cpu.h defines __nv_bfloat16), `extern __shared__ T name[];` (dynamic
shared memory becomes the launch's buffer) and `__shared__ T name[N];` (static shared memory becomes a reference
to storage of the OS thread's that every block starts with all ones, as it starts with garbage on a GPU:
cuda_cpu.h, block_shared); the globaltimer read of kernels/collectives.cu (inline PTX) becomes the steady clock.
Libraries are cached by the hash of what was compiled ($CUPYNET_EMULATOR_CACHE, default
~/.cache/cupynet-emulated-gpu).
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent / "cuda_cpu.h"
DRIVER_STUB = Path(__file__).resolve().parent / "cuda_driver_stub.cpp"
COMPILER = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-fno-strict-aliasing")
# $CUPYNET_EMULATOR_SANITIZE=1: kernels built with AddressSanitizer, so a read or write past the end of an
# array stops the run with a report, like compute-sanitizer's memcheck (the process needs libasan
# preloaded: tests/test_emulated_gpu.py shows how), and with UndefinedBehaviorSanitizer's alignment check, so
# does a misaligned load or store (a 16-byte pack off a 16-byte boundary), which a GPU refuses ("misaligned
# address") and an x86 CPU mostly forgives
SANITIZE_FLAGS = ("-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer")
# Where glibc reserves static TLS for libraries loaded later (GLIBC_TUNABLES=glibc.rtld.optional_static_tls=N, set
# before the process starts: tests/test_emulated_gpu.py does), kernels read threadIdx, blockIdx and the scheduler's
# state at a fixed offset instead of calling __tls_get_addr at each access (7% of a training run's time): an emulated
# run 10% faster. Without the reserve, dlopen would refuse such a library ("cannot allocate memory in static TLS
# block"), so the flag follows the variable.
INITIAL_EXEC_TLS = ("-ftls-model=initial-exec",)
ERROR_BYTES = 512
DEFAULT_DYNAMIC_SHARED_LIMIT = 48 * 1024

_BF16_INCLUDE = re.compile(r"^\s*#\s*include\s*<cuda_bf16\.h>\s*$", re.MULTILINE)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
# `__shared__ T name;` or `__shared__ T name[N]...;` (not extern: _DYNAMIC_SHARED's, rewritten first)
_STATIC_SHARED = re.compile(r"(?<![\w])__shared__\s+([\w:<>\s]+?)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")
_GLOBALTIMER = re.compile(r'asm\s+volatile\s*\(\s*"mov\.u64 %0, %%globaltimer;"\s*:\s*"=l"\s*\(\s*(\w+)\s*\)\s*\)\s*;')

_BUILD_LOCK = threading.Lock()


class KernelError(RuntimeError):
    """A launch the GPU would have refused or run wrongly (bad argument, bad geometry, deadlock)."""


def compiler_problem():
    """None when a C++20 compiler is available, else why not (one line)."""
    if shutil.which(COMPILER) is None:
        return f"no C++ compiler ({COMPILER}) on PATH"
    return None


def cpu_source(code):
    """CUDA source -> C++ source for cuda_cpu.h (the rewrites of the module docstring)."""
    code = _BF16_INCLUDE.sub("/* <cuda_bf16.h>: cuda_cpu.h */", code)
    code = _DYNAMIC_SHARED.sub(r"\1* \2 = static_cast<\1*>(cpuemu::dynamic_shared());", code)
    # a lambda's type is unique to its place (and to each instantiation of an enclosing template): one storage
    code = _STATIC_SHARED.sub(r"auto& \2 = cpuemu::block_shared<\1\3>([] {});", code)
    return _GLOBALTIMER.sub(r"\1 = cpuemu::global_time_ns();", code)


# Kernels whose blocks wait for each other (a grid-wide barrier): their blocks run concurrently
# (cuda_cpu.h, launch_concurrent), and the emulated CuPy refuses a grid larger than the GPU would hold.
GRID_WAITING_KERNELS = ("bn_stats_apply", "bn_grad_dx")


def waits_for_the_grid(expression):
    """Whether the kernel of a name expression ('bn_grad_dx<float>') synchronizes its whole grid."""
    return expression.split("<")[0] in GRID_WAITING_KERNELS


def _wrappers(name_expressions):
    lines = []
    for index, expression in enumerate(name_expressions):
        launcher = "launch_concurrent" if waits_for_the_grid(expression) else "launch"
        lines += [
            f'extern "C" int cpuemu_launch_{index}(const unsigned* g, const unsigned* b, size_t smem, void** args, '
            f"char* error, int error_bytes)",
            f"{{ return cpuemu::{launcher}(&{expression}, g, b, smem, args, error, error_bytes); }}",
            f'extern "C" const char* cpuemu_signature_{index}()',
            f"{{ static const std::string s = cpuemu::signature(&{expression}); return s.c_str(); }}",
        ]
    return "\n".join(lines)


def _cache_dir():
    return Path(os.environ.get("CUPYNET_EMULATOR_CACHE", Path.home() / ".cache" / "cupynet-emulated-gpu"))


def _flags():
    return FLAGS + (SANITIZE_FLAGS if os.environ.get("CUPYNET_EMULATOR_SANITIZE") == "1" else ()) + (
        INITIAL_EXEC_TLS if "optional_static_tls" in os.environ.get("GLIBC_TUNABLES", "") else ())


def build_library(code, name_expressions):
    """The path of the compiled shared library for `code` and its kernels (compiled once, then cached)."""
    flags = _flags()
    source = "\n".join([f'#include "{HEADER}"', cpu_source(code), _wrappers(name_expressions), ""])
    key = hashlib.sha256((source + HEADER.read_text() + " ".join(flags)).encode()).hexdigest()[:24]
    return _build(source, flags, _cache_dir() / f"kernels-{key}.so", "the kernels")


def build_driver_stub():
    """The folder of libcuda.so.1 built from cuda_driver_stub.cpp (the driver function cupynet calls itself), for
    the emulated GPU's LD_LIBRARY_PATH (compiled once, then cached)."""
    source = DRIVER_STUB.read_text()
    key = hashlib.sha256((source + " ".join(FLAGS)).encode()).hexdigest()[:24]
    library = _build(source, FLAGS, _cache_dir() / f"driver-{key}" / "libcuda.so.1", "the driver stub")
    return library.parent


def _build(source, flags, library, what):
    """Compile `source` into the shared library `library`, unless it is there already."""
    with _BUILD_LOCK:
        if library.is_file():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as work:
            source_file = Path(work) / "module.cpp"
            source_file.write_text(source)
            output = Path(work) / "module.so"
            # not under a preloaded AddressSanitizer runtime (a sanitized run's): g++ itself would crawl
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            result = subprocess.run([COMPILER, *flags, str(source_file), "-o", str(output)],
                                    capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise KernelError(f"g++ could not compile {what} for the CPU:\n{result.stderr[-4000:]}")
            os.replace(output, library)
    return library


# numpy scalar type -> the parameter code it matches (cuda_cpu.h, cpuemu::type_code)
def _scalar_code(value):
    dtype = np.asarray(value).dtype
    kind = {"i": "i", "u": "u", "f": "f"}.get(dtype.kind)
    if kind is None:
        return None
    return f"{kind}{dtype.itemsize}"


_CTYPES = {"i4": ctypes.c_int32, "i8": ctypes.c_int64, "u4": ctypes.c_uint32, "u8": ctypes.c_uint64,
           "f4": ctypes.c_float, "f8": ctypes.c_double}


class CompiledModule:
    """The kernels of one source, compiled for the CPU, launchable by name expression."""

    def __init__(self, code, name_expressions):
        self.name_expressions = list(name_expressions)
        self._library = ctypes.CDLL(str(build_library(code, self.name_expressions)))
        self.signatures = {}
        self._entry = {}
        for index, expression in enumerate(self.name_expressions):
            signature = getattr(self._library, f"cpuemu_signature_{index}")
            signature.restype = ctypes.c_char_p
            self.signatures[expression] = signature().decode().split()
            entry = getattr(self._library, f"cpuemu_launch_{index}")
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_int]
            self._entry[expression] = entry

    def pack(self, expression, grid, block, shared_mem, args):
        """The checked geometry and argument buffers of one launch; keep the result alive until it has run."""
        check_geometry(grid, block, shared_mem)
        codes = self.signatures[expression]
        if len(args) != len(codes):
            raise KernelError(f"{expression}: {len(args)} arguments for {len(codes)} parameters")
        holders = []
        for position, (code, arg) in enumerate(zip(codes, args)):
            if code == "p":
                if isinstance(arg, np.generic) or not hasattr(arg, "ctypes"):
                    raise KernelError(f"{expression}: argument {position} must be an array (pointer parameter), "
                                      f"got {type(arg).__name__}")
                holders.append(ctypes.c_void_p(arg.ctypes.data))
                continue
            if not isinstance(arg, np.generic):
                raise KernelError(f"{expression}: argument {position} is a {type(arg).__name__}; pass a NumPy "
                                  f"scalar of the parameter's type ({code})")
            if _scalar_code(arg) != code:
                raise KernelError(f"{expression}: argument {position} is {np.asarray(arg).dtype}, the parameter "
                                  f"is {code} (kind and bytes)")
            holders.append(_CTYPES[code](arg.item()))
        pointers = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        return (ctypes.c_uint * 3)(*_three(grid)), (ctypes.c_uint * 3)(*_three(block)), int(shared_mem), holders, \
            pointers

    def launch(self, expression, grid, block, shared_mem, args, packed=None):
        """Run one launch to completion on this thread (packed: a `pack` result to reuse)."""
        grid3, block3, shared_mem, _, pointers = packed or self.pack(expression, grid, block, shared_mem, args)
        error = ctypes.create_string_buffer(ERROR_BYTES)
        if self._entry[expression](grid3, block3, shared_mem, pointers, error, ERROR_BYTES):
            raise KernelError(f"{expression}: {error.value.decode()}")


def check_geometry(grid, block, shared_mem):
    """What cudaLaunchKernel refuses at once (cudaErrorInvalidConfiguration), checked at enqueue time."""
    grid, block = _three(grid), _three(block)
    threads = block[0] * block[1] * block[2]
    if not 1 <= threads <= 1024 or min(block) < 1 or block[2] > 64:
        raise KernelError(f"invalid block {block}")
    if min(grid) < 1 or grid[0] > 2 ** 31 - 1 or grid[1] > 65535 or grid[2] > 65535:
        raise KernelError(f"invalid grid {grid}")
    # past 48 KB a kernel needs cudaFuncAttributeMaxDynamicSharedMemorySize raised first (CuPy:
    # RawKernel.max_dynamic_shared_size_bytes), which cupynet never does
    if not 0 <= int(shared_mem) <= DEFAULT_DYNAMIC_SHARED_LIMIT:
        raise KernelError(f"dynamic shared memory of {shared_mem} bytes (at most {DEFAULT_DYNAMIC_SHARED_LIMIT} "
                          f"without raising the kernel's limit)")


def _three(dims):
    dims = tuple(int(d) for d in (dims if isinstance(dims, tuple) else (dims,)))
    if not 1 <= len(dims) <= 3:
        raise KernelError(f"launch dimensions {dims}")
    return dims + (1,) * (3 - len(dims))
