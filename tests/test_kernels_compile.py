"""CPU checks of the GPU backend's code: no GPU needed, so these run in CI.

  * every kernels/*.cu compiles with nvcc for sm_90 (an H100 cubin, as CuPy compiles it: -ftz=true; its PTX kept),
    every registered instantiation (float and __nv_bfloat16) included, and each expected entry point is in the
    PTX: kernel syntax and type errors surface here (skipped, with the reason printed, where nvcc is not on PATH);
  * the same sources compile with NVRTC exactly as CuPy's RawModule compiles them (CuPy's options and
    include paths, the name expressions of cupynet/backends/kernels.py), where CuPy and NVRTC load;
  * in those cubins no kernel spills registers or keeps a stack frame (local memory: off-chip traffic no roofline
    counts), from ptxas's own report;
  * the registry in kernels.py names every __global__ of the sources and nothing else;
  * CupyBackend implements every public method of NumpyBackend with the same signature.

    python -m pytest tests/test_kernels_compile.py -q -ra
"""
import inspect
import pathlib
import re
import shutil
import subprocess

import pytest

from cupynet.backends import kernels as K
from cupynet.backends.numpy_backend import NumpyBackend

GLOBAL_KERNEL = re.compile(r"__global__\s+void\s+(\w+)\s*\(")
EXTERN_C_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
NVCC_TIMEOUT_S = 120


def instantiation_wrapper(file):
    """A .cu that includes kernels/<file> and takes the address of every registered instantiation,
    which makes nvcc compile them (nvcc has no name expressions)."""
    addresses = [f"    (const void*)&{K.expression(name, args)},"
                 for name, instantiations in K.KERNELS[file].items() for args in instantiations]
    return "\n".join([
        f'#include "{K.kernels_dir() / file}"',
        "const void* cupynet_instantiations[] = {      // external linkage: never 'unused'",
        *addresses,
        "    nullptr,",
        "};",
        "",
    ])


def entry_count(ptx, name, templated):
    """How many .entry points of kernel `name` the PTX has (templates: Itanium-mangled _Z<len><name>I...)."""
    if templated:
        pattern = rf"^\.visible \.entry _Z\d*{len(name)}{name}I\w*\("
    else:
        pattern = rf"^\.visible \.entry {name}\("
    return len(re.findall(pattern, ptx, flags=re.MULTILINE))


def ptxas_entries(log):
    """(entry, ptxas's "Used N registers, ..." line, its (stack frame, spill store, spill load) bytes) for each
    entry point in `nvcc -Xptxas -v` output."""
    entry, frame = None, None
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)'", line):
            entry, frame = match.group(1), None
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            frame = tuple(int(n) for n in match.groups())
        elif re.search(r"Used \d+ registers", line) and entry is not None:
            yield entry, line, frame or (0, 0, 0)


def ptxas_resources(log):
    """{entry: (registers, stack frame bytes, spill store bytes, spill load bytes)} from `nvcc -Xptxas -v` output."""
    return {entry: (int(re.search(r"Used (\d+) registers", used).group(1)),) + frame
            for entry, used, frame in ptxas_entries(log)}


def ptxas_static_shared(log):
    """{entry: bytes of static __shared__ memory} from `nvcc -Xptxas -v` output (0 where ptxas reports none)."""
    return {entry: int(smem.group(1)) if (smem := re.search(r"(\d+) bytes smem", used)) else 0
            for entry, used, _ in ptxas_entries(log)}


def compile_cubins(sources, out, extra=()):
    """{name: (returncode, ptxas -v log)}: each source compiled to an sm_90 (H100) cubin, all at once, with -ftz=true
    as CuPy compiles our kernels."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot compile kernels/*.cu here")
    jobs = {}
    for name, text in sources.items():
        source = out / f"{name}.cu"
        source.write_text(text)
        command = [nvcc, "-cubin", "-arch=sm_90", "-std=c++17", "-ftz=true", "-Xptxas", "-v", *extra, str(source),
                   "-o", str(out / f"{name}.cubin")]
        jobs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {name: job.communicate(timeout=NVCC_TIMEOUT_S)[0] for name, job in jobs.items()}
    return {name: (job.returncode, logs[name]) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def sm90_builds(tmp_path_factory):
    """file -> (returncode, nvcc's output with ptxas's report, PTX text): every file compiled at once to an sm_90
    (H100) cubin as CuPy compiles it (-ftz=true), warnings as errors, its PTX kept."""
    out = tmp_path_factory.mktemp("ptx")
    names = {file: f"wrap_{pathlib.Path(file).stem}" for file in K.KERNELS}
    compiled = compile_cubins({names[file]: instantiation_wrapper(file) for file in K.KERNELS}, out,
                              extra=("-Werror", "all-warnings", "--keep", "--keep-dir", str(out)))
    kept = {file: out / f"{names[file]}.ptx" for file in K.KERNELS}
    return {file: compiled[names[file]] + (kept[file].read_text() if kept[file].exists() else "",)
            for file in K.KERNELS}


@pytest.mark.parametrize("file", sorted(K.KERNELS))
def test_nvcc_compiles_every_instantiation(sm90_builds, file):
    returncode, log, ptx = sm90_builds[file]
    assert returncode == 0, f"nvcc failed on kernels/{file}:\n{log}"
    for name, instantiations in K.KERNELS[file].items():
        expected = len(instantiations) if instantiations else 1
        assert entry_count(ptx, name, templated=bool(instantiations)) == expected, (file, name)


@pytest.mark.parametrize("file", sorted(K.KERNELS))
def test_every_entry_waits_for_prior_grids_then_lets_the_next_launch_on_hopper(sm90_builds, file):
    """start_after_prior_grids() (common.cuh) is Hopper's griddepcontrol.wait, then griddepcontrol.launch_dependents,
    in every kernel compiled for sm_90: one of each per entry point, the wait first (--programmatic-launch's edges
    rely on the wait; tests/test_programmatic_launch.py checks the source)."""
    _, _, ptx = sm90_builds[file]
    entries = re.split(r"^\.visible \.entry ", ptx, flags=re.MULTILINE)[1:]
    assert entries, file
    for body in entries:
        assert body.count("griddepcontrol.wait") == 1 and body.count("griddepcontrol.launch_dependents") == 1, file
        assert body.index("griddepcontrol.wait") < body.index("griddepcontrol.launch_dependents"), file


@pytest.mark.parametrize("file", sorted(K.KERNELS))
def test_no_kernel_spills_registers_or_keeps_a_stack_frame_on_hopper(sm90_builds, file):
    """Local memory is off-chip: a kernel that spills registers (the BatchNorm reductions' launch bounds cap them at
    65,536 / (256 x 3) = 85), or keeps an array it indexes at run time in a stack frame, pays memory traffic its
    roofline does not count. ptxas's report for every entry point, compiled as CuPy compiles it for an H100."""
    returncode, log, _ = sm90_builds[file]
    assert returncode == 0, log
    resources = ptxas_resources(log)
    expected = sum(len(i) if i else 1 for i in K.KERNELS[file].values())
    assert len(resources) == expected, (file, sorted(resources))
    assert {entry: r for entry, r in resources.items() if r[1:] != (0, 0, 0)} == {}


@pytest.mark.parametrize("file", sorted(K.KERNELS))
def test_static_shared_memory_leaves_the_backends_dynamic_share_within_48_kb(sm90_builds, file):
    """Without raising a kernel's limit (cupynet never does), a launch's static and dynamic shared memory together
    stay within 48 KB, or it fails on the GPU. The backend asks for at most MAX_DYNAMIC_SHARED_BYTES of dynamic
    shared memory (and the emulated GPU refuses more than 48 KB of it), so every kernel's static __shared__ must fit
    in what that leaves."""
    from cupynet.backends.cupy_operands import MAX_DYNAMIC_SHARED_BYTES
    returncode, log, _ = sm90_builds[file]
    assert returncode == 0, log
    shared = ptxas_static_shared(log)
    assert shared and len(shared) == len(ptxas_resources(log)), file
    too_much = {entry: size for entry, size in shared.items() if size + MAX_DYNAMIC_SHARED_BYTES > 48 * 1024}
    assert too_much == {}, f"static __shared__ beyond {48 * 1024 - MAX_DYNAMIC_SHARED_BYTES} bytes: {too_much}"


def test_the_static_shared_memory_check_reads_ptxas(tmp_path):
    """The check above can fail: ptxas reports a kernel's static __shared__ array, here 2 KB."""
    compiled = compile_cubins({"shared_probe": (
        'extern "C" __global__ void shared_probe(float* y) { __shared__ float tile[512]; '
        "tile[threadIdx.x] = y[threadIdx.x]; __syncthreads(); y[threadIdx.x] = tile[511 - threadIdx.x]; }")},
        tmp_path)
    returncode, log = compiled["shared_probe"]
    assert returncode == 0, log
    assert ptxas_static_shared(log) == {"shared_probe": 2048}


def test_the_local_memory_check_sees_a_stack_frame(tmp_path):
    """The check above can fail: a kernel storing into a local array at places known only at run time keeps it in a
    stack frame (one it only reads so, the compiler can rewrite into a computation)."""
    source = ("__global__ void keeps_a_stack_frame(const int* at, float* out) {\n"
              "    float values[64];\n"
              "    for (int i = 0; i < 64; ++i) values[at[i] & 63] = out[i];      // stored at run-time places\n"
              "    out[threadIdx.x] = values[at[64 + threadIdx.x] & 63];\n"
              "}\n")
    returncode, log = compile_cubins({"probe": source}, tmp_path)["probe"]
    assert returncode == 0, log
    (registers, frame, _, _), = ptxas_resources(log).values()
    assert frame >= 64 * 4 and registers > 0


def _nvrtc_compiler():
    """CuPy's NVRTC program class and option assembly, or skip with the reason."""
    try:
        import cupy._core.core as cupy_core
        from cupy.cuda import compiler, nvrtc
        nvrtc.getVersion()                       # loads libnvrtc (fails where it is not installed)
    except Exception as error:
        pytest.skip(f"CuPy with NVRTC not available here ({type(error).__name__}: {' '.join(str(error).split())[:120]})")
    if not hasattr(compiler, "_NVRTCProgram") or not hasattr(cupy_core, "assemble_cupy_compiler_options"):
        pytest.skip("this CuPy version has no _NVRTCProgram / assemble_cupy_compiler_options to mirror")
    return compiler, cupy_core


@pytest.mark.parametrize("file", sorted(K.KERNELS))
def test_nvrtc_compiles_like_cupy_raw_module(file):
    """The source and name expressions kernels.py hands to cupy.RawModule, with the options CuPy adds
    itself (-ftz=true, its include paths, --device-as-default-execution-space), for sm_90 (H100)."""
    compiler, cupy_core = _nvrtc_compiler()
    options = cupy_core.assemble_cupy_compiler_options(
        K.COMPILE_OPTIONS + ("-ftz=true", "-arch=compute_90", "--device-as-default-execution-space"))
    program = compiler._NVRTCProgram(K.module_source(file), file, name_expressions=K.expressions(file), method="ptx")
    _, mapping = program.compile(options)
    assert sorted(mapping) == sorted(K.expressions(file))


def test_registry_matches_the_sources():
    """Every __global__ of kernels/*.cu is registered (templates with instantiations, extern "C" without)."""
    directory = K.kernels_dir()
    assert sorted(p.name for p in directory.glob("*.cu")) == sorted(K.KERNELS)
    for file, registered in K.KERNELS.items():
        source = (directory / file).read_text()
        extern_c = set(EXTERN_C_KERNEL.findall(source))
        assert set(GLOBAL_KERNEL.findall(source)) == set(registered), file
        for name, instantiations in registered.items():
            assert (name in extern_c) == (not instantiations), f"{file}: {name}"


def test_module_source_pastes_the_header_once():
    source = K.module_source("batchnorm.cu")
    assert not re.search(r'^\s*#\s*include\s+"common.cuh"', source, flags=re.MULTILINE)
    assert source.count("begin common.cuh") == 1
    assert "pragma once" not in source
    assert "template <typename T> __device__ T block_sum" in source


def test_cupy_backend_implements_the_whole_contract():
    """Same public methods, same parameter names, order and defaults as the NumPy reference."""
    from cupynet.backends.cupy_backend import CupyBackend     # importable without CuPy
    for name, member in inspect.getmembers(NumpyBackend, predicate=inspect.isfunction):
        if name.startswith("_"):
            continue
        assert hasattr(CupyBackend, name), f"CupyBackend lacks {name}"
        assert inspect.signature(getattr(CupyBackend, name)) == inspect.signature(member), name
    assert CupyBackend.name == "cupy"


def test_batchnorm_constants_the_backend_mirrors_are_the_kernels():
    """The backend sizes launches after constants of kernels/batchnorm.cu: the reductions' blocks (BN_THREADS,
    for which slice_lanes spreads the finalize over every channel at once), how many an SM holds
    (BN_BLOCKS_PER_SM, their launch bounds) and bn_sums_finalize's grid (finalize_blocks mirrors slice_lanes)."""
    from cupynet.backends import cupy_batchnorm
    source = (K.kernels_dir() / "batchnorm.cu").read_text()
    for name in ("BN_THREADS", "BN_BLOCKS_PER_SM"):
        assert int(re.search(rf"#define {name} (\d+)", source).group(1)) == getattr(cupy_batchnorm, name), name
    lanes = {16: 16, 32: 8, 64: 4, 3: 32, 48: 4, 200: 1, 2064: 1}      # slice_lanes(C), as the kernel computes it
    for channels, per_channel in lanes.items():
        assert cupy_batchnorm.finalize_blocks(channels) == -(-channels * per_channel // 32), channels
