"""cupy.RawModule of the emulated CuPy: kernels compiled for the CPU, launched on the current stream."""
import math

import kernel_runner

from cupy.cuda import driver, runtime

from cupy.cuda.device import current_id
from cupy.cuda.stream import SPINNING_KERNELS, get_current_stream, run_in_background, wait_for_device_idle


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            with open(path) as source:
                code = source.read()
        self.name_expressions = list(name_expressions or [])
        self._module = kernel_runner.CompiledModule(code, self.name_expressions)
        self._loaded = set()

    def get_function(self, name):
        if name not in self._module.signatures:
            raise KeyError(f"{name} is not among the name expressions {self.name_expressions}")
        if name not in self._loaded:
            # CUDA's lazy loading (the default since 12.2) loads a kernel at its first cuModuleGetFunction,
            # which may wait for the device: a kernel spinning until another thread's work arrives
            # then never finishes (the deadlock CUDA's lazy-loading guide warns about).
            wait_for_device_idle(current_id())
            self._loaded.add(name)
        return RawKernel(self._module, name)


class Function:
    """What RawKernel.kernel is in CuPy: the loaded function, whose `ptr` the driver's queries take."""

    def __init__(self, ptr):
        self.ptr = ptr


class RawKernel:
    """kernel(grid, block, args, shared_mem=0): runs now, or is recorded when the stream is capturing."""

    def __init__(self, module, expression):
        self._module = module
        self.name = expression
        self.kernel = Function(id(self))

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        stream = stream if stream is not None else get_current_stream()
        if kernel_runner.waits_for_the_grid(self.name):
            self._check_resident(grid, block, shared_mem)
        # geometry and arguments checked now, as CUDA and CuPy do at launch
        packed = self._module.pack(self.name, grid, block, shared_mem, tuple(args))
        keep = tuple(args)                                      # recorded launches keep their arrays alive

        def run():
            return self._module.launch(self.name, grid, block, shared_mem, keep, packed=packed)
        what = f"kernel {self.name}"
        stream.enqueue(run, what)
        if what in SPINNING_KERNELS and not stream.is_capturing():
            run_in_background(stream)

    def _check_resident(self, grid, block, shared_mem):
        """A kernel whose blocks wait for each other must fit the GPU whole (else, on a GPU, it may hang)."""
        blocks, threads = math.prod(kernel_runner._three(grid)), math.prod(kernel_runner._three(block))
        resident = runtime.multiprocessor_count() * driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.kernel.ptr, threads, shared_mem)
        if blocks > resident:
            raise kernel_runner.KernelError(f"{self.name}: {blocks} blocks wait for each other, but the GPU holds "
                                            f"only {resident} at once: the launch would never finish")
