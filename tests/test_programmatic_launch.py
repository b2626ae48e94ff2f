"""--programmatic-launch on the CPU: which edges of a captured step's graph become programmatic
(cupynet/backends/programmatic_launch.py), and that every kernel waits for the kernel before it first thing, which
is what makes such an edge safe. The rewrite on a real graph and the steps it runs: tests/test_step_options_gpu.py
(on a GPU; the emulated GPU's driver stub reads graphs as empty)."""
import re

from cupynet.backends import kernels as K
from cupynet.backends.programmatic_launch import choose

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
    first statement must be wait_for_prior_grids() (common.cuh), or it could read what is not yet written."""
    for file in K.KERNELS:
        source = (K.kernels_dir() / file).read_text()
        first_statements = re.findall(r"__global__[^{;]*\)\s*\{\s*([^;]*;)", source)
        assert len(first_statements) == source.count("__global__"), file
        assert set(first_statements) == {"wait_for_prior_grids();"}, (file, first_statements)
