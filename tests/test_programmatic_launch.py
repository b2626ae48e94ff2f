"""--programmatic-launch on the CPU: which edges of a captured step's graph become programmatic
(cupynet/backends/programmatic_launch.py), the edge data they get (checked against the CUDA driver's own header),
and that every kernel waits for the kernel before it first thing, which is what makes such an edge safe; and the
argument types ctypes passes to every driver call (cupynet/backends/cuda_driver.py) against cuda.h. The
rewrite on a real graph and the steps it runs: tests/test_step_options_gpu.py (on a GPU; the emulated GPU's driver
stub reads graphs as empty)."""
import re
import shutil
import subprocess

import pytest

from cupynet.backends import kernels as K
from cupynet.backends import node_priorities, programmatic_launch
from cupynet.backends.programmatic_launch import choose, edge_data

PLAIN = bytes(8)
PROGRAMMATIC = bytes([1, 0, 1, 0, 0, 0, 0, 0])


def test_only_edges_from_a_kernel_into_one_of_ours_that_waits_for_nothing_else_become_programmatic():
    # cudnn -> ours -> ours -> ours (which also waits for a side stream's cuDNN kernel); ours -> cudnn;
    # a memset -> ours; an edge already programmatic
    kernels = {"cudnn", "a", "b", "joined", "side", "cudnn_after", "after_memset", "p", "q"}
    ours = {"a", "b", "joined", "after_memset", "q"}
    edges = [("cudnn", "a", PLAIN), ("a", "b", PLAIN), ("b", "joined", PLAIN), ("side", "joined", PLAIN),
             ("b", "cudnn_after", PLAIN), ("memset", "after_memset", PLAIN), ("p", "q", PROGRAMMATIC)]
    assert choose(edges, kernels, ours) == [("cudnn", "a"), ("a", "b")]
    assert choose(edges, kernels, set()) == []


def test_every_kernel_waits_for_the_kernel_before_it_before_anything_else():
    """A programmatic edge lets a kernel start before the one it follows has finished: every __global__ function's
    first statement must be start_after_prior_grids() (common.cuh), or it could read what is not yet written."""
    for file in K.KERNELS:
        source = (K.kernels_dir() / file).read_text()
        first_statements = re.findall(r"__global__[^{;]*\)\s*\{\s*([^;]*;)", source)
        assert len(first_statements) == source.count("__global__"), file
        assert set(first_statements) == {"start_after_prior_grids();"}, (file, first_statements)


# Prints what cuda.h says: the edge data of both kinds of programmatic edge, byte by byte, and the constants.
def nvcc_or_skip():
    """nvcc's path (its toolkit holds the cuda.h the probes compile against), or skip with the reason."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: no cuda.h to compare with")
    return nvcc


HEADER_PROBE = r"""
#include <cuda.h>
#include <cstdio>
static void print_edge(unsigned char port) {
    CUgraphEdgeData edge = {};
    edge.from_port = port;
    edge.type = CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC;
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&edge);
    for (unsigned i = 0; i < sizeof edge; ++i) std::printf("%02x", bytes[i]);
    std::printf("\n");
}
int main() {
    print_edge(CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC);
    print_edge(CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER);
    std::printf("%d %d\n", (int)CU_GRAPH_NODE_TYPE_KERNEL, (int)CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY);
    return 0;
}
"""


def test_the_edge_data_and_the_constants_are_the_cuda_headers(tmp_path):
    """The bytes make_programmatic hands cuGraphAddDependencies_v2 (from the programmatic port, and with
    --programmatic-launch-early from the launch-order port; the programmatic dependency type), the kernel node type
    and --stream-priorities' instantiation flag, as the CUDA toolkit's cuda.h defines them (nvcc compiles a probe
    against it; skipped where nvcc is not on PATH). The driver is called through ctypes, which checks none of this."""
    (tmp_path / "probe.cpp").write_text(HEADER_PROBE)
    build = subprocess.run([nvcc_or_skip(), "-x", "c++", "probe.cpp", "-o", "probe"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=30,
                           check=True).stdout.split()
    assert lines[0] == edge_data(at_block_start=False).hex() and lines[1] == edge_data(at_block_start=True).hex()
    assert len(edge_data()) == programmatic_launch.EDGE_DATA_BYTES
    assert [int(word) for word in lines[2:]] == [programmatic_launch.KERNEL_NODE, node_priorities.USE_NODE_PRIORITY]


def signature_probe(signatures):
    """C++ whose static_asserts hold when each (name, ctypes argument types) matches the function cuda.h declares: as
    many parameters, each of the kind its ctypes type passes (a handle or pointer for c_void_p, a pointer to one for
    POINTER(c_void_p), an integer of the same width and signedness, a pointer to one, a pointer to a 4-byte int or
    enum), and a CUresult as wide as the int ctypes reads back."""
    import ctypes

    def integer(ctype, name="T"):      # ctypes cannot tell size_t from unsigned long long: both are c_ulong here
        signed = "is_signed" if ctype(-1).value == -1 else "is_unsigned"
        return (f"std::is_integral<{name}>::value && std::{signed}<{name}>::value && "
                f"sizeof({name}) == {ctypes.sizeof(ctype)}")

    def kind(argtype):
        if argtype is ctypes.c_void_p:
            return "std::is_pointer<T>::value"
        if argtype is ctypes.POINTER(ctypes.c_void_p):
            return "std::is_pointer<T>::value && std::is_pointer<typename std::remove_pointer<T>::type>::value"
        if argtype is ctypes.POINTER(ctypes.c_int):         # an int or an enum (CUgraphNodeType) of its width
            return "std::is_pointer<T>::value && sizeof(typename std::remove_pointer<T>::type) == sizeof(int)"
        if argtype is ctypes.POINTER(ctypes.c_size_t):
            return "std::is_pointer<T>::value && " + integer(ctypes.c_size_t, "typename std::remove_pointer<T>::type")
        return integer(argtype)

    lines = ["#include <cuda.h>", "#include <cstddef>", "#include <tuple>", "#include <type_traits>",
             "template <typename F> struct Params;",
             "template <typename R, typename... A> struct Params<R (*)(A...)> {",
             "    using types = std::tuple<A...>;",
             "    static constexpr std::size_t count = sizeof...(A);",
             "};",
             "static_assert(sizeof(CUresult) == sizeof(int), \"CUresult\");"]
    for name, argtypes in signatures.items():
        lines.append(f"static_assert(Params<decltype(&{name})>::count == {len(argtypes)}, \"{name}: arity\");")
        for i, argtype in enumerate(argtypes):
            lines += [f"namespace {name}_{i} {{ using T = std::tuple_element<{i}, Params<decltype(&{name})>::types>::type;",
                      f"static_assert({kind(argtype)}, \"{name}: parameter {i}\"); }}"]
    return "\n".join(lines) + "\nint main() { return 0; }\n"


def compile_probe(source, tmp_path):
    (tmp_path / "signatures.cpp").write_text(source)
    return subprocess.run([nvcc_or_skip(), "-x", "c++", "-std=c++17", "-c", "signatures.cpp", "-o", "signatures.o"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_the_driver_calls_ctypes_makes_are_declared_so_in_cuda_h(tmp_path):
    """cuda_driver.SIGNATURES, the argument types ctypes passes to each driver function, against cuda.h's prototypes
    (nvcc compiles a probe of static_asserts; skipped where nvcc is not on PATH): ctypes checks none of it, and a
    wrong one is a crash or garbage on the GPU."""
    from cupynet.backends.cuda_driver import SIGNATURES
    build = compile_probe(signature_probe(SIGNATURES), tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]


def test_the_signature_probe_fails_on_a_wrong_signature(tmp_path):
    """The check above can fail: one argument too few, and a size_t where cuda.h has a pointer."""
    import ctypes
    wrong = {"cuGraphGetNodes": (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)),
             "cuGraphNodeGetType": (ctypes.c_void_p, ctypes.c_size_t)}
    build = compile_probe(signature_probe(wrong), tmp_path)
    assert build.returncode != 0
    assert "cuGraphGetNodes: arity" in build.stderr and "cuGraphNodeGetType: parameter 1" in build.stderr
