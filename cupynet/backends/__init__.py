"""Backends: where the primitives of the contract run.

Exactly two: `numpy_backend.NumpyBackend` (the readable reference, CPU) and `cupy_backend.CupyBackend`
(cuDNN Frontend convolutions and our kernels in kernels/*.cu, one CUDA device). `create_backend` turns a
device from --gpus into a backend, and turns every reason a GPU cannot be used (CuPy or the cuDNN Frontend
not installed, no device, an id that is not there) into a one-line DeviceError.

    backend = create_backend("cpu", layout="NHWC", dtype="float32")
    backend = create_backend(0, layout="NHWC", dtype="bfloat16")
"""
from cupynet.errors import DeviceError

# Side streams the GPU backend's weight gradients take in turn (--wgrad-streams). 1 until a GPU run
# shows more to be faster: bench/layouts.py --wgrad-streams 1,2,3 measures it.
WGRAD_STREAMS = 1
MAX_WGRAD_STREAMS = 16
# Slices of the batch each weight gradient is computed over, side by side, then summed (--wgrad-chunks):
# deterministic parallelism for small convolutions. 1 until a GPU run shows more to be faster
# (bench/layouts.py --wgrad-chunks 1,2,4).
WGRAD_CHUNKS = 1
MAX_WGRAD_CHUNKS = 16
# Launches per BatchNorm pass on the GPU (--bn-launches): 2 (a reduction, then the elementwise half) or 1 (both
# in one kernel, its blocks waiting for the reduction's finalize). 2 until a GPU run shows 1 to be faster.
BN_LAUNCHES = 2

GPU_INSTALL_HINT = ("pip install 'cupynet[gpu]' (CuPy >= 14, cuDNN 9, the cuDNN Frontend, NCCL) "
                    "on a machine with an NVIDIA GPU")


def gpu_problem():
    """None when the GPU backend can run here, else a sentence saying why not."""
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed; GPU training needs {GPU_INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:      # CUDARuntimeError without a driver, or no device at all
        return f"no CUDA device is visible to CuPy ({' '.join(str(error).split())})"
    if count == 0:
        return "no CUDA device is visible to CuPy"
    try:
        import cudnn  # noqa: F401  (the cuDNN Frontend's Python package)
    except Exception as error:
        return f"the cuDNN Frontend is not importable ({type(error).__name__}: {error}); install it with {GPU_INSTALL_HINT}"
    return None


def gpu_count():
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def resolve_devices(devices):
    """Replace 'auto' by what is available: GPU 0 when the GPU backend can run, else the CPU."""
    if devices == ["auto"]:
        return [0] if gpu_problem() is None else ["cpu"]
    return devices


def check_devices(devices, flag="--gpus"):
    """Reject GPU ids that are not there, before anything starts; the message names `flag`, the one they came by."""
    gpu_ids = [d for d in devices if d != "cpu"]
    if not gpu_ids:
        return
    problem = gpu_problem()
    if problem:
        raise DeviceError(f"{flag} {','.join(map(str, gpu_ids))}: {problem}")
    count = gpu_count()
    missing = [d for d in gpu_ids if d >= count]
    if missing:
        raise DeviceError(f"{flag}: no GPU {missing[0]} on this machine (it has {count}: ids 0-{count - 1})")


def check_dtype(device, dtype):
    """Reject a --dtype the device's backend does not have (before anything is built or written)."""
    if device == "cpu" and dtype == "bfloat16":
        raise DeviceError("--dtype bfloat16 needs the GPU backend; on the CPU use float32 (or float64)")
    if device != "cpu" and dtype == "float64":
        raise DeviceError("--dtype float64 is CPU-only (the NumPy reference); on a GPU use float32 or bfloat16")


def create_backend(device, layout, dtype, tf32=True, autotune=True, wgrad_streams=WGRAD_STREAMS,
                   deterministic=True, wgrad_chunks=WGRAD_CHUNKS, bn_launches=BN_LAUNCHES, split_k=False,
                   conv_genstats=False, pixel_pairs=False, residual_grad_sums=False, wgrad_pixel_pairs=False,
                   stream_priorities=False, tune_in_graph=False, padded_input=False, programmatic_launch=False,
                   programmatic_launch_early=False, own_conv_channels=0):
    """A backend for one worker's device: 'cpu' or a GPU id (checked with check_devices first).
    tf32, autotune (time cuDNN's candidate engines, keep the fastest), wgrad_streams (side streams the
    weight gradients take in turn), deterministic (only cuDNN engines that repeat their bits), bn_launches
    (per BatchNorm pass), split_k (the autotuner also times split-K settings of the weight gradients'
    engines), pixel_pairs and wgrad_pixel_pairs (stage 1's convolutions, their forwards and data gradients
    or their weight gradients, on pixel pairs, NHWC), stream_priorities (the main stream before the weight
    gradients' side streams), tune_in_graph (the autotuner times each engine replayed from a CUDA graph),
    padded_input (the network's input padded to a 16-byte pixel, NHWC), programmatic_launch (the captured
    step's edges into our kernels programmatic) and programmatic_launch_early (... from the launch-order port:
    once the kernel before has begun; implies programmatic_launch) and own_conv_channels (the 3x3 forwards and data
    gradients of at most that many channels in our own tensor-core kernel, NHWC) concern the GPU only;
    wgrad_chunks (weight gradients per slice of the batch, then summed), conv_genstats (convolutions
    before BatchNorm also give its sums) and residual_grad_sums (a residual block's input-gradient add also
    reduces the next BatchNorm's gradient sums) both."""
    check_dtype(device, dtype)
    if device == "cpu":
        from cupynet.backends.numpy_backend import NumpyBackend
        return NumpyBackend(layout=layout, dtype=dtype, wgrad_chunks=wgrad_chunks, conv_genstats=conv_genstats,
                            residual_grad_sums=residual_grad_sums)
    check_devices([device])
    from cupynet.backends.cupy_backend import CupyBackend
    return CupyBackend(device_id=device, layout=layout, dtype=dtype, tf32=tf32, autotune=autotune,
                       wgrad_streams=wgrad_streams, deterministic=deterministic, wgrad_chunks=wgrad_chunks,
                       bn_launches=bn_launches, split_k=split_k, conv_genstats=conv_genstats,
                       pixel_pairs=pixel_pairs, residual_grad_sums=residual_grad_sums,
                       wgrad_pixel_pairs=wgrad_pixel_pairs, stream_priorities=stream_priorities,
                       tune_in_graph=tune_in_graph, padded_input=padded_input,
                       programmatic_launch=programmatic_launch,
                       programmatic_launch_early=programmatic_launch_early,
                       own_conv_channels=own_conv_channels)
