"""Programmatic edges into our kernels in the captured step (--programmatic-launch): less idle time between kernels.

Why: in the captured bf16 step on an H100 (2026-11-27, `bench/timeline.py --from-trace` on run 1's trace), one
kernel followed the one before it on the same stream after a median of 0.42 us where both were ours (120 times a
step) and 0.45 us after a cuDNN kernel (85 times): about 87 us of a 3,029-us step in which the GPU waited for the
next launch. Hopper's programmatic dependent launch lets the GPU launch a kernel before the one it depends on has
finished, so that its launch overlaps that kernel's end; the kernel itself then waits, with `griddepcontrol.wait`,
until that kernel has finished and its writes are visible.

How: after the step is captured, every edge of the CUDA graph from a kernel node into one of our kernels that
has no other incoming edge (a kernel that follows another on one stream) becomes a programmatic edge, and the
graph is instantiated again (backends/cuda_driver.py). Every kernel of kernels/*.cu calls
`start_after_prior_grids()` (common.cuh) before it touches memory: it waits there for the kernel before it, so an
early launch computes what a plain one does, the same bits. cuDNN's kernels do not wait, so edges into them stay as
they are, as do edges from anything but a kernel (memsets, events) and into a kernel that also waits for other work
(a side stream's join). Eager steps are unchanged.

When the dependent may launch depends on the edge's port in the upstream kernel:
  * `--programmatic-launch`: the programmatic port, once every block of the upstream kernel has triggered its
    dependents or exited. Ours trigger right after their wait (`start_after_prior_grids()`), so a kernel of ours
    lets the next one launch as soon as all its blocks run; cuDNN's kernels may never trigger, and then the next
    kernel launches as their blocks exit, which still spares the launch's round trip.
  * `--programmatic-launch-early` (implies the former): the launch-order port, once every block of the upstream
    kernel has begun, whatever kernel it is (CUDA's "trigger at block start"), so after cuDNN's kernels too. Its
    cost: a chain of short kernels may have more than two of them in flight, their blocks holding SMs while they
    wait, which the weight gradients on the side streams could have used. Which is faster is for a GPU run to say.

`choose` decides on a graph's nodes and edges (tested on the CPU); `make_programmatic` reads and rewrites the
captured graph through the driver.
"""
import ctypes

from cupynet.backends import cuda_driver

OPTION = "--programmatic-launch"
KERNEL_NODE = 0                 # CU_GRAPH_NODE_TYPE_KERNEL
PROGRAMMATIC_PORT = 1           # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC: all blocks triggered or exited
LAUNCH_ORDER_PORT = 2           # CU_GRAPH_KERNEL_NODE_PORT_LAUNCH_ORDER: all blocks have begun
PROGRAMMATIC_TYPE = 1           # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
EDGE_DATA_BYTES = 8             # CUgraphEdgeData: from_port, to_port, type, 5 reserved bytes
KERNEL_PARAMS_BYTES = 256       # more than CUDA_KERNEL_NODE_PARAMS_v2 holds; its first field is the CUfunction


def choose(edges, kernel_nodes, our_nodes):
    """The edges (from, to) to make programmatic: from a kernel node (in kernel_nodes) into one of our kernels (in
    our_nodes) that no other edge leads into, and not programmatic already. `edges`: (from, to, edge data bytes)."""
    incoming = {}
    for _, to, _ in edges:
        incoming[to] = incoming.get(to, 0) + 1
    return [(start, end) for start, end, data in edges
            if start in kernel_nodes and end in our_nodes and incoming[end] == 1 and not any(data)]


def edge_data(at_block_start=False):
    """A programmatic edge's CUgraphEdgeData (8 bytes): from the upstream kernel's programmatic port, or with
    at_block_start from its launch-order port; to the whole dependent; the programmatic dependency type."""
    port = LAUNCH_ORDER_PORT if at_block_start else PROGRAMMATIC_PORT
    return bytes([port, 0, PROGRAMMATIC_TYPE, 0, 0, 0, 0, 0])


def make_programmatic(graph_handle, our_functions, at_block_start=False):
    """Rewrite the captured CUgraph `graph_handle` as `choose` says, our kernels known by their CUfunction handles
    (ints), each new edge's data `edge_data(at_block_start)`; returns how many edges became programmatic. The
    device's context must be current."""
    nodes = _nodes(graph_handle)
    kernel_nodes, our_nodes = set(), set()
    for node in nodes:
        kind = ctypes.c_int()
        cuda_driver.call(OPTION, "cuGraphNodeGetType", ctypes.c_void_p(node), ctypes.byref(kind))
        if kind.value == KERNEL_NODE:
            kernel_nodes.add(node)
            if _function_of(node) in our_functions:
                our_nodes.add(node)
    chosen = choose(_edges(graph_handle), kernel_nodes, our_nodes)
    if chosen:
        count = len(chosen)
        starts = (ctypes.c_void_p * count)(*[start for start, _ in chosen])
        ends = (ctypes.c_void_p * count)(*[end for _, end in chosen])
        plain = ctypes.create_string_buffer(EDGE_DATA_BYTES * count)       # the edges' data now: all zero
        programmatic = ctypes.create_string_buffer(edge_data(at_block_start) * count, EDGE_DATA_BYTES * count)
        cuda_driver.call(OPTION, "cuGraphRemoveDependencies_v2", ctypes.c_void_p(graph_handle), starts, ends, plain,
                         count)
        cuda_driver.call(OPTION, "cuGraphAddDependencies_v2", ctypes.c_void_p(graph_handle), starts, ends,
                         programmatic, count)
    return len(chosen)


def _function_of(kernel_node):
    """The CUfunction (an int) a kernel node runs, or None where the driver cannot say (a library's kernel launched
    by other means than ours, which CuPy launches with cuLaunchKernel: then not ours either)."""
    params = ctypes.create_string_buffer(KERNEL_PARAMS_BYTES)
    status = cuda_driver.function(OPTION, "cuGraphKernelNodeGetParams_v2")(ctypes.c_void_p(kernel_node), params)
    return ctypes.c_void_p.from_buffer(params).value if status == 0 else None


def _nodes(graph_handle):
    count = ctypes.c_size_t()
    cuda_driver.call(OPTION, "cuGraphGetNodes", ctypes.c_void_p(graph_handle), None, ctypes.byref(count))
    nodes = (ctypes.c_void_p * max(count.value, 1))()
    cuda_driver.call(OPTION, "cuGraphGetNodes", ctypes.c_void_p(graph_handle), nodes, ctypes.byref(count))
    return [nodes[i] for i in range(count.value)]


def _edges(graph_handle):
    """[(from, to, edge data bytes)] of the graph."""
    count = ctypes.c_size_t()
    cuda_driver.call(OPTION, "cuGraphGetEdges_v2", ctypes.c_void_p(graph_handle), None, None, None,
                     ctypes.byref(count))
    size = max(count.value, 1)
    starts, ends = (ctypes.c_void_p * size)(), (ctypes.c_void_p * size)()
    data = ctypes.create_string_buffer(EDGE_DATA_BYTES * size)
    cuda_driver.call(OPTION, "cuGraphGetEdges_v2", ctypes.c_void_p(graph_handle), starts, ends, data,
                     ctypes.byref(count))
    return [(starts[i], ends[i], data.raw[EDGE_DATA_BYTES * i:EDGE_DATA_BYTES * (i + 1)])
            for i in range(count.value)]
