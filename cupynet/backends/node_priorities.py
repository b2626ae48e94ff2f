"""A captured step that keeps its streams' priorities (--stream-priorities): the graph instantiated by the driver.

Why: the weight gradients run on side streams beside the main chain (forward, data gradients, BatchNorm),
and on an H100 the main chain's kernels ran slower beside them (2026-11-27: a stage-1 data gradient took 29-31 us
beside stage 1's weight gradients, 21.5 us alone).
With the main stream at the device's highest priority and the side streams at its lowest, the block
scheduler hands free SMs to the main chain's waiting blocks first and the weight gradients fill in around it.

Streams keep their priority in eager steps. A captured graph records each kernel node with the priority of the
stream it was captured from, but a launched graph runs every node at the launch stream's priority unless it was
instantiated with CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY, and CuPy's `end_capture` instantiates with no
flags. So the backend (CapturedGraph) instantiates the captured cudaGraph_t again with that flag, through the driver
API's cuGraphInstantiateWithFlags (backends/cuda_driver.py), and launches that executable graph with CuPy's
`runtime.graphLaunch`.
"""
USE_NODE_PRIORITY = 8           # CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY (cuda.h)
HIGHEST_PRIORITY = -(1 << 20)   # CUDA clamps a stream priority to the device's range: this is its greatest
LOWEST_PRIORITY = 0             # the least priority in CUDA's range (also every stream's default)
