"""The emulated GPU's own rules, checked: a test run on it means something only if it refuses what CUDA,
CuPy, cuDNN and NCCL refuse, and runs kernels as a device would.

Runs only inside the emulation (tests/test_emulated_gpu.py passes this file to a pytest subprocess with
tests/emulated_gpu first on PYTHONPATH); its name keeps the normal test run from collecting it.
"""
import threading

import numpy as np
import pytest

import cupy
import cudnn
from cupy._array import EmulationError
from kernel_runner import KernelError

pytestmark = pytest.mark.gpu

ADD_ONE = r"""
extern "C" __global__ void add_one(float* x, int n)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] += 1.0f;
}

// Sum of x over one block through shared memory, warp shuffles and __syncthreads, into out[0].
extern "C" __global__ void block_total(const float* x, int n, float* out)
{
    __shared__ float per_warp[32];
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += per_warp[w];
        out[0] = total;
    }
}

// Block 0 alone writes `seen`; every block then stores what it reads there.
extern "C" __global__ void shared_left_over(float* out)
{
    __shared__ float seen;
    if (blockIdx.x == 0 && threadIdx.x == 0) seen = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = seen;
}

// Lanes from `live` on return at once; lane 0 then takes lane `delta`'s 1 by a shuffle, into out[0].
extern "C" __global__ void shuffle_from(int live, int delta, float* out)
{
    if ((int)threadIdx.x >= live) return;
    const float v = __shfl_down_sync(0xffffffffu, 1.0f, delta);
    if (threadIdx.x == 0) out[0] = v;
}
"""
ADD_ONE_KERNELS = ["add_one", "block_total", "shuffle_from", "shared_left_over"]


@pytest.fixture(scope="module")
def module():
    return cupy.RawModule(code=ADD_ONE, name_expressions=ADD_ONE_KERNELS)


def test_kernels_run_with_shared_memory_shuffles_and_barriers(module):
    x = cupy.asarray(np.arange(1000, dtype=np.float32))
    out = cupy.zeros((1,), dtype=np.float32)
    module.get_function("block_total")((1,), (256,), (x, np.int32(1000), out))
    assert float(out.get()[0]) == float(np.arange(1000).sum())
    module.get_function("add_one")((3,), (128,), (x, np.int32(1000)))
    np.testing.assert_array_equal(x.get(), np.arange(1000, dtype=np.float32) + 1)


def test_every_block_starts_with_garbage_in_its_static_shared_memory(module):
    """A block never sees what another block left in shared memory (on a GPU each has its own): what it did not
    write reads NaN, whichever order the launches run their blocks in."""
    for _ in range(2):
        out = cupy.zeros((3,), dtype=np.float32)
        module.get_function("shared_left_over")((3,), (32,), (out,))
        np.testing.assert_array_equal(out.get(), [1.0, np.nan, np.nan])


@pytest.mark.parametrize("threads, live, delta, expected", [
    (32, 32, 5, 1.0),              # a live lane's value
    (32, 32, 40, 1.0),             # past the warp: the lane's own value, CUDA's rule
    (32, 4, 5, np.nan),            # an exited lane: undefined on a GPU, NaN here
    (8, 8, 16, np.nan),            # a lane the block does not have: likewise
])
def test_a_shuffle_from_an_exited_or_missing_lane_reads_garbage(module, threads, live, delta, expected):
    out = cupy.zeros((1,), dtype=np.float32)
    module.get_function("shuffle_from")((1,), (threads,), (np.int32(live), np.int32(delta), out))
    np.testing.assert_array_equal(out.get(), [expected])


@pytest.mark.parametrize("bad, why", [(1000, "Python int"), (np.int64(1000), "64-bit for an int"),
                                      (np.float32(3), "float for an int")])
def test_scalar_arguments_must_have_the_parameter_type(module, bad, why):
    x = cupy.zeros((4,), dtype=np.float32)
    with pytest.raises(KernelError):
        module.get_function("add_one")((1,), (32,), (x, bad))


def test_a_pointer_parameter_needs_an_array_and_geometry_is_checked(module):
    with pytest.raises(KernelError, match="must be an array"):
        module.get_function("add_one")((1,), (32,), (np.int32(0), np.int32(4)))
    x = cupy.zeros((4,), dtype=np.float32)
    with pytest.raises(KernelError, match="invalid block"):
        module.get_function("add_one")((1,), (2048,), (x, np.int32(4)))
    module.get_function("add_one")((1,), (32,), (x, np.int32(4)), shared_mem=48 * 1024)
    with pytest.raises(KernelError, match="dynamic shared memory of 49153 bytes"):
        module.get_function("add_one")((1,), (32,), (x, np.int32(4)), shared_mem=48 * 1024 + 1)


def test_empty_memory_is_poisoned_and_host_device_mixing_is_refused():
    assert np.isnan(cupy.empty((3,), dtype=np.float32).get()).all()
    with pytest.raises(TypeError):
        cupy.zeros((3,), dtype=np.float32) + np.ones(3, dtype=np.float32)


def test_captured_work_runs_on_each_replay_not_during_the_capture(module):
    x = cupy.zeros((64,), dtype=np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        module.get_function("add_one")((1,), (64,), (x, np.int32(64)))
        graph = stream.end_capture()
    assert not x.get(stream=stream).any()
    graph.launch(stream)
    graph.launch(stream)
    assert not x.get().any()                      # the null stream does not wait for `stream`: a race on a GPU
    assert (x.get(stream=stream) == 2).all()


def test_capture_refuses_host_work_and_unjoined_streams(module):
    stream, side = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    x = cupy.zeros((8,), dtype=np.float32)
    with stream:
        stream.begin_capture()
        with pytest.raises(EmulationError, match="capturing"):
            x.get()
        with pytest.raises(EmulationError, match="capturing"):
            x += 1
        fork = cupy.cuda.Event()
        fork.record(stream)
        side.wait_event(fork)                     # the side stream joins the capture
        module.get_function("add_one")((1,), (32,), (x, np.int32(8)), stream=side)
        with pytest.raises(EmulationError, match="Unjoined"):
            stream.end_capture()                  # its work was never joined back
    with stream:
        stream.begin_capture()
        fork.record(stream)
        side.wait_event(fork)
        module.get_function("add_one")((1,), (32,), (x, np.int32(8)), stream=side)
        join = cupy.cuda.Event()
        join.record(side)
        stream.wait_event(join)
        stream.end_capture().launch(stream)
    assert (x.get(stream=stream) == 1).all()


def _conv_graph(output_stride):
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=cupy.cuda.get_current_stream().ptr)
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FLOAT, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    x = graph.tensor(name="x", dim=[1, 2, 3, 3], stride=[18, 9, 3, 1], data_type=cudnn.data_type.FLOAT)
    w = graph.tensor(name="w", dim=[4, 2, 1, 1], stride=[2, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
    y = graph.conv_fprop(image=x, weight=w, pre_padding=[0, 0], post_padding=[0, 0], stride=[1, 1],
                         dilation=[1, 1], compute_data_type=cudnn.data_type.FLOAT)
    y.set_output(True)
    if output_stride:
        y.set_stride([36, 9, 3, 1])
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A])
    graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE, cudnn.numerical_note.NONDETERMINISTIC])
    graph.check_support()
    graph.build_plans()
    return graph, handle, (x, w, y)


def test_work_runs_in_stream_order_and_only_when_something_waits_for_it(module):
    """A side stream's kernel runs when the main stream's queued wait for its event runs, not before, and a
    read that waits for nothing sees the memory as it is (stale): a missing event fails here, not by chance."""
    main, side = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    x = cupy.zeros((8,), dtype=np.float32)
    module.get_function("add_one")((1,), (32,), (x, np.int32(8)), stream=side)
    done = cupy.cuda.Event()
    done.record(side)
    assert not x.get(stream=main).any()           # main never waited for side
    main.wait_event(done)
    assert (x.get(stream=main) == 1).all()        # now it has


def test_leaving_a_with_block_rewinds_to_the_stack_not_to_use():
    """CuPy keeps a per-thread stack of `with` streams: use() lasts only until the next `with` block ends,
    after which array work lands on the null stream (what the H100 run showed)."""
    stream = cupy.cuda.Stream(non_blocking=True)
    seen = []

    def thread():
        stream.use()
        seen.append(cupy.cuda.get_current_stream() is stream)
        with stream:
            pass
        seen.append(cupy.cuda.get_current_stream() is cupy.cuda.Stream.null)
    worker = threading.Thread(target=thread)
    worker.start()
    worker.join()
    assert seen == [True, True]


def test_host_copies_given_a_stream_are_asynchronous_and_the_null_stream_waits_for_no_non_blocking_stream():
    """set(stream=s) runs in s's order: null-stream array work that reads the copy without an event sees
    the memory as it was (the bug the H100 run found in ParamStore), and reads it after a sync of s."""
    stream = cupy.cuda.Stream(non_blocking=True)
    source, target = cupy.empty((4,), dtype=np.float32), cupy.zeros((4,), dtype=np.float32)
    source.set(np.arange(4, dtype=np.float32), stream=stream)
    target[...] = source                          # the null stream: source not copied yet (NaN poison)
    assert np.isnan(target.get()).all()
    stream.synchronize()
    target[...] = source
    assert (target.get() == np.arange(4)).all()


def test_a_kernels_first_load_waits_for_the_devices_queued_work(module):
    """CUDA's lazy loading: the first get_function of a kernel may wait for the whole device, so work queued
    on any stream of the device has run after it (a barrier kernel spinning there would hang the load)."""
    fresh = cupy.RawModule(code=ADD_ONE, name_expressions=ADD_ONE_KERNELS)
    stream = cupy.cuda.Stream(non_blocking=True)
    x = cupy.zeros((8,), dtype=np.float32)
    module.get_function("add_one")((1,), (32,), (x, np.int32(8)), stream=stream)
    assert not stream.done
    fresh.get_function("block_total")
    assert stream.done


def test_cudnn_reads_and_writes_through_strides_and_defaults_outputs_to_nhwc():
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    w_host = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    expected = np.einsum("nchw,kc->nkhw", x_host, w_host[:, :, 0, 0])
    for output_stride, layout_of_y in ((True, "NCHW"), (False, "NHWC")):
        graph, handle, (x, w, y) = _conv_graph(output_stride)
        xd, wd, yd = cupy.asarray(x_host), cupy.asarray(w_host), cupy.zeros((36,), dtype=np.float32)
        graph.execute({x: xd.data.ptr, w: wd.data.ptr, y: yd.data.ptr}, 0, handle=handle)
        cupy.cuda.get_current_stream().synchronize()
        got = yd.get().reshape(1, 4, 3, 3) if layout_of_y == "NCHW" else \
            yd.get().reshape(1, 3, 3, 4).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_cudnn_deselecting_before_plans_exist_does_nothing():
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FLOAT, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT)
    x = graph.tensor(name="x", dim=[1, 2, 3, 3], stride=[18, 9, 3, 1])
    w = graph.tensor(name="w", dim=[4, 2, 1, 1], stride=[2, 1, 1, 1])
    graph.conv_fprop(image=x, weight=w, pre_padding=[0, 0], post_padding=[0, 0], stride=[1, 1], dilation=[1, 1])
    graph.validate()
    graph.build_operation_graph()
    graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE])      # too early
    graph.create_execution_plans([cudnn.heur_mode.A])
    graph.check_support()
    graph.build_plans()
    assert cudnn.numerical_note.TENSOR_CORE in cudnn.ENGINES[graph._default_engine()].numerical


def test_nccl_refuses_two_ranks_on_one_device_and_sums_across_threads():
    with pytest.raises(cupy.cuda.nccl.NcclError, match="duplicate"):
        cupy.cuda.nccl.NcclCommunicator.initAll([0, 0])
    comms = cupy.cuda.nccl.NcclCommunicator.initAll([0])
    x = cupy.asarray(np.arange(5, dtype=np.float32))
    comms[0].allReduce(x.data.ptr, x.data.ptr, 5, cupy.cuda.nccl.NCCL_FLOAT32, cupy.cuda.nccl.NCCL_SUM,
                       cupy.cuda.get_current_stream().ptr)
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(x.get(), np.arange(5, dtype=np.float32))


def test_nccl_abort_releases_a_rank_waiting_for_its_peer():
    import os
    if int(os.environ.get("CUPYNET_EMULATED_GPUS", "1")) < 2:
        pytest.skip("needs CUPYNET_EMULATED_GPUS >= 2")
    comms = cupy.cuda.nccl.NcclCommunicator.initAll([0, 1])
    x = cupy.zeros((3,), dtype=np.float32)
    threading.Timer(0.5, comms[1].abort).start()
    comms[0].allReduce(x.data.ptr, x.data.ptr, 3, cupy.cuda.nccl.NCCL_FLOAT32, cupy.cuda.nccl.NCCL_SUM,
                       cupy.cuda.get_current_stream().ptr)             # enqueued
    with pytest.raises(cupy.cuda.nccl.NcclError, match="abort"):
        cupy.cuda.get_current_stream().synchronize()                   # runs it: waits for rank 1, then the abort


def test_blocks_that_wait_for_each_other_run_at_once_and_must_fit_the_gpu(monkeypatch):
    """A grid-waiting kernel (kernel_runner.GRID_WAITING_KERNELS, here cupynet's one-launch BatchNorm) runs every
    block at once, so its blocks can wait for each other; a grid larger than the GPU holds at once (SMs x the
    driver's occupancy) is refused, as on a GPU it could wait forever."""
    from cupynet.backends.kernels import KernelLibrary
    from cupy.cuda import driver, runtime
    library = KernelLibrary(cupy.cuda.Device(0))
    c, n = 4, 64                     # NHWC (16, 1, 1, 4): a block reads 8 rows of the 4 channels; P slices of rows
    x = cupy.asarray(np.arange(n, dtype=np.float32).reshape(16, 1, 1, c))
    y = cupy.empty_like(x)
    vectors = [cupy.zeros((c,), dtype=np.float32) for _ in range(4)]
    ones = cupy.ones((c,), dtype=np.float32)
    resident = runtime.multiprocessor_count() * driver.occupancyMaxActiveBlocksPerMultiprocessor(1, 32, 4096)

    def launch(slices):
        partials = cupy.zeros((2, slices, c), dtype=np.float32)
        library.launch("bn_stats_apply", ("float",), (1, slices), (32,),
                       (x, x, y, np.int32(c), np.int32(1), np.int32(16), np.int32(c), partials,
                        cupy.zeros((2,), dtype=np.uint32), np.float64(0.5), np.float64(1e-5), *vectors, ones, ones,
                        np.int32(n), np.int32(0), np.int32(0), np.int32(0), np.int32(0)), shared_mem=4096)
        return cupy.asnumpy(y)

    out = launch(resident)                               # every block waits for the last one's statistics
    columns = np.arange(n, dtype=np.float64).reshape(16, c)
    expected = (columns - columns.mean(axis=0)) / np.sqrt(columns.var(axis=0) + 1e-5) + 1.0
    np.testing.assert_allclose(out.reshape(16, c), expected, rtol=1e-5)
    with pytest.raises(KernelError, match="would never finish"):
        launch(resident + 1)


def test_two_threads_running_each_others_event_waits_do_not_deadlock():
    """Emulated streams run lazily, in whichever thread needs their work. Thread B runs stream 1, whose next
    piece waits for stream 2; thread A holds stream 2, whose next piece waits for stream 1's first piece, which
    has already run: A must not wait for stream 1's lock (B holds it) to see that. (On a GPU nobody waits: the
    emulation once deadlocked here, two workers sharing the emulated GPU.)"""
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    a_holds_s2, b_holds_s1 = threading.Event(), threading.Event()
    s1.enqueue(lambda: None, "stream 1's first piece")
    first = s1.record()
    s1.enqueue(b_holds_s1.set, "B inside stream 1")
    s2.enqueue(lambda: (a_holds_s2.set(), b_holds_s1.wait(10)), "A inside stream 2")
    s2.wait_event(first)                    # stream 2 then waits for stream 1's first piece (already run)
    s1.wait_event(s2.record())              # stream 1 then waits for all of stream 2

    def b():
        a_holds_s2.wait(10)
        s1.run_all()

    threads = [threading.Thread(target=s2.run_all, daemon=True), threading.Thread(target=b, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "the two threads wait for each other"



def test_a_thread_waiting_for_a_streams_lock_sees_the_work_it_needs_finish_meanwhile():
    """Thread B needs stream 1's first piece, which thread A is running: B waits for stream 1's lock. A then
    goes on with stream 1, whose next piece waits for stream 2, which B holds. B must notice that its piece
    has run while it waits, instead of waiting for the lock A will not release. (The emulation deadlocked
    here too, about one run in seven of the shared-GPU host-communicator test on a loaded machine.)"""
    s1, s2 = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    a_inside, release_a = threading.Event(), threading.Event()
    s1.enqueue(lambda: (a_inside.set(), release_a.wait(10)), "A inside stream 1")
    first = s1.record()
    s2.wait_event(first)                    # stream 2 waits for stream 1's first piece (not run yet)
    s1.wait_event(s2.record())              # then stream 1 waits for all of stream 2
    a = threading.Thread(target=s1.run_all, daemon=True)
    b = threading.Thread(target=s2.run_all, daemon=True)
    a.start()
    assert a_inside.wait(10)
    b.start()
    b.join(0.3)                             # B is now waiting for stream 1's lock
    release_a.set()
    for thread in (a, b):
        thread.join(20)
    assert not a.is_alive() and not b.is_alive(), "the two threads wait for each other"


def test_streams_are_listed_safely_while_another_thread_creates_them():
    """Array destructors and kernel loads list every stream, in any thread, while a worker may be creating
    its backend's streams: the listing must never fail (it did: a WeakSet changed size during iteration)."""
    import sys
    import time
    from cupy.cuda import stream as streams
    failures = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda failure: failures.append(repr(failure.exc_value))
    pending = cupy.cuda.Stream(non_blocking=True)
    pending.enqueue(lambda: None, "queued work: freeing an array lists the streams")
    stop = time.monotonic() + 1.5

    def create():
        while time.monotonic() < stop:
            for _ in range(50):
                cupy.cuda.Stream(non_blocking=True)

    def list_them():
        while time.monotonic() < stop:
            try:
                array = cupy.empty((4,), dtype=np.float32)
                del array
                streams.wait_for_device_idle(0)
            except RuntimeError as error:
                failures.append(repr(error))
    try:
        threads = [threading.Thread(target=create), threading.Thread(target=list_them)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.unraisablehook = hook
        pending.synchronize()
    assert failures == []


def test_enqueueing_never_waits_for_the_stream_to_run():
    """A launch returns at once on a GPU, even while the stream is busy (a shared-GPU barrier spinning on it,
    run by another thread here): enqueueing must not wait for the thread that runs the stream's work."""
    import time
    s = cupy.cuda.Stream(non_blocking=True)
    inside, release = threading.Event(), threading.Event()
    s.enqueue(lambda: (inside.set(), release.wait(10)), "long-running work")
    runner = threading.Thread(target=s.run_all, daemon=True)
    runner.start()
    assert inside.wait(10)
    started = time.monotonic()
    s.enqueue(lambda: None, "the next launch")
    took = time.monotonic() - started
    release.set()
    runner.join(10)
    s.synchronize()
    assert took < 1.0, f"enqueue waited {took:.1f} s for the stream's running work"

def test_failed_queued_work_raises_for_the_streams_owner_too():
    """Whoever runs a stream's failing work sees the error, and so does every later wait on that stream (a
    CUDA error is sticky): another worker loading a kernel must not leave the owner believing it ran."""
    from cupy.cuda import stream as streams
    owner = cupy.cuda.Stream(non_blocking=True)
    written = []

    def fail():
        raise KernelError("an out-of-bounds write")
    owner.enqueue(fail, "failing work")
    owner.enqueue(lambda: written.append(1), "work after it")
    try:
        with pytest.raises(KernelError):
            streams.wait_for_device_idle(owner.device_id)   # as another thread's first kernel load does
        with pytest.raises(KernelError, match="out-of-bounds"):
            owner.synchronize()
        with pytest.raises(KernelError):
            owner.record().synchronize()
        assert written == []
    finally:
        owner._error = None             # the later tests of this process sync the device, this stream too
        owner.synchronize()


def test_a_device_synchronize_waits_for_its_own_device_only():
    """cudaDeviceSynchronize covers the current device: a thread synchronizing device 1 must not run device
    0's queued work (another worker's, which may wait for that very thread)."""
    ran = []
    with cupy.cuda.Device(0):
        zero = cupy.cuda.Stream(non_blocking=True)
        zero.enqueue(lambda: ran.append(0), "device 0's work")
    with cupy.cuda.Device(1):
        one = cupy.cuda.Stream(non_blocking=True)
        one.enqueue(lambda: ran.append(1), "device 1's work")
    cupy.cuda.Device(1).synchronize()
    assert ran == [1]
    cupy.cuda.Device(0).synchronize()
    assert ran == [1, 0]

WAIT_FOREVER = r"""
import numpy as np
import cupy
from cupynet.backends.kernels import module_source
source = "#undef GRID_WAIT_LIMIT_NS\n#define GRID_WAIT_LIMIT_NS 1000000ull\n" + module_source("batchnorm.cu")
kernel = cupy.RawModule(code=source, options=("-std=c++17",),
                        name_expressions=["bn_stats_apply<float>"]).get_function("bn_stats_apply<float>")
c, n = 4, 64
x = cupy.asarray(np.arange(n, dtype=np.float32).reshape(16, 1, 1, c))
sync = cupy.asarray(np.array([7, 0], dtype=np.uint32))   # a count no block can complete: nobody is last
vectors = [cupy.zeros((c,), dtype=np.float32) for _ in range(6)]
kernel((1, 2), (32,), (x, x, cupy.empty_like(x), np.int32(c), np.int32(1), np.int32(16), np.int32(c),
                       cupy.zeros((2, 2, c), dtype=np.float32), sync, np.float64(0.5), np.float64(1e-5), *vectors,
                       np.int32(n), np.int32(0), np.int32(0), np.int32(0), np.int32(0)), shared_mem=4096)
cupy.cuda.runtime.deviceSynchronize()
print("returned")
"""


def test_a_grid_wide_wait_that_never_ends_traps():
    """The one-launch BatchNorm kernels' watchdog: blocks waiting for a finalize that never comes (here an
    arrival count no block completes) trap after GRID_WAIT_LIMIT_NS instead of hanging (1 ms for this test)."""
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", WAIT_FOREVER], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ))
    assert result.returncode != 0 and "returned" not in result.stdout
    assert "a kernel executed __trap()" in result.stderr, result.stderr[-2000:]
