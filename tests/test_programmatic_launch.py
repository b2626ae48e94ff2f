"""--programmatic-launch on the CPU: which edges of a captured step's graph become programmatic
(cupynet/backends/programmatic_launch.py), the edge data they get (checked against the CUDA driver's own header),
and that every kernel waits for the kernel before it first thing, which is what makes such an edge safe. The
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
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: no cuda.h to compare with")
    (tmp_path / "probe.cpp").write_text(HEADER_PROBE)
    build = subprocess.run([nvcc, "-x", "c++", "probe.cpp", "-o", "probe"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=30,
                           check=True).stdout.split()
    assert lines[0] == edge_data(at_block_start=False).hex() and lines[1] == edge_data(at_block_start=True).hex()
    assert len(edge_data()) == programmatic_launch.EDGE_DATA_BYTES
    assert [int(word) for word in lines[2:]] == [programmatic_launch.KERNEL_NODE, node_priorities.USE_NODE_PRIORITY]
