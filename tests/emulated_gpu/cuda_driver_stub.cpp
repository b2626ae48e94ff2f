// The one CUDA driver function cupynet calls itself (through ctypes: cupynet/backends/node_priorities.py), for the
// emulated GPU, built as libcuda.so.1 (kernel_runner.build_driver_stub) and found through LD_LIBRARY_PATH.
// An emulated graph's executable is the graph's own handle (the emulated runtime's graphLaunch runs the graph of
// that handle); flags other than CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY are refused, as a CUDA_ERROR_
// INVALID_VALUE (1), so the emulation checks that the backend asks for per-node priorities.
extern "C" int cuGraphInstantiateWithFlags(void** executable, void* graph, unsigned long long flags)
{
    if (executable == nullptr || graph == nullptr || flags != 8ull)
        return 1;
    *executable = graph;
    return 0;
}
