// The CUDA driver functions cupynet calls itself (through ctypes: cupynet/backends/cuda_driver.py), for the
// emulated GPU, built as libcuda.so.1 (kernel_runner.build_driver_stub) and found through LD_LIBRARY_PATH.
// An emulated graph lives in the emulated CuPy (Python), out of this library's sight:
//   * instantiation: the executable is the graph's own handle (the emulated runtime's graphLaunch runs the graph
//     of that handle); flags other than none and CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY (8) are refused,
//     as a CUDA_ERROR_INVALID_VALUE (1), so the emulation checks what the backend asks for;
//   * the graph's nodes and edges (--programmatic-launch): a graph reads as empty, so nothing is rewritten (the
//     rewrite's choice is tested on the CPU, tests/test_programmatic_launch.py); the calls that would read or
//     change a node are refused, since no node is ever handed out.
#include <cstddef>

extern "C" int cuGraphInstantiateWithFlags(void** executable, void* graph, unsigned long long flags)
{
    if (executable == nullptr || graph == nullptr || (flags != 0ull && flags != 8ull))
        return 1;
    *executable = graph;
    return 0;
}

extern "C" int cuGraphGetNodes(void* graph, void** nodes, size_t* count)
{
    if (graph == nullptr || count == nullptr)
        return 1;
    *count = 0;
    return 0;
}

extern "C" int cuGraphGetEdges_v2(void* graph, void** from, void** to, void* data, size_t* count)
{
    if (graph == nullptr || count == nullptr)
        return 1;
    *count = 0;
    return 0;
}

extern "C" int cuGraphNodeGetType(void*, int*) { return 1; }
extern "C" int cuGraphKernelNodeGetParams_v2(void*, void*) { return 1; }
extern "C" int cuGraphRemoveDependencies_v2(void*, void**, void**, void*, size_t) { return 1; }
extern "C" int cuGraphAddDependencies_v2(void*, void**, void**, void*, size_t) { return 1; }
