"""BatchNorm on the GPU: the BatchNorm primitives of CupyBackend (a mixin of it) and how their kernels are launched.

The forward's statistics and the backward's dgamma and dbeta are per-channel sums over the batch and the pixels.
A reduction kernel (bn_stats, bn_grad, ...) reads the activation in tiles, each block storing its partial sums;
the launch's last block to arrive adds them in double and finalizes (kernels/batchnorm.cu). Then an elementwise
kernel (bn_apply, bn_backward_dx) uses the statistics. With bn_launches=1 both halves run in one kernel whose blocks
wait for the finalize (a grid-wide wait: the grid is capped at what the GPU holds). The split-BN primitives (sync
BN across workers) stop at the sums, which the workers all-reduce, and continue from them; with
--residual-grad-sums, relu_backward_add_bn_grad adds a BatchNorm's gradient sums in the residual add's pass and
batchnorm_backward_dx finishes that BatchNorm's backward.

The mixin uses the backend's kernels, scratch buffers, layout (nchw_dims) and launch helpers (_launch_packed,
_launch_1d); the backend sets _bn_plans, bn_launches and overlap_wgrad.
"""
import numpy as np

try:                                # importable without CuPy, so CPU tests can inspect the class
    import cupy
except ImportError:                 # pragma: no cover - depends on the machine
    cupy = None

from cupynet.backends.cupy_operands import (MAX_DYNAMIC_SHARED_BYTES, MAX_SLICES, MIN_STEPS_PER_THREAD,
                                            element_count, i32, overlap, pack_aligned, pack_elements, present,
                                            primitive, require_dtype, same_dtype)
from cupynet.backends.kernels import RELU_FROM_INPUT, RELU_FROM_OUTPUT, RELU_NONE, ctype
from cupynet.backends.layout import check_relu_mask

BN_THREADS = 256                    # threads per block of the BatchNorm partial sums
FINALIZE_THREADS = 32               # bn_sums_finalize: one warp a block
# The BatchNorm reductions' blocks per SM (batchnorm.cu's BN_BLOCKS_PER_SM, which bounds their registers so
# that an SM holds that many): their grids are one wave. bn_grad in bf16 with the relu mask recomputed from x
# needs about 80 registers a thread, so an SM holds 3 of its 256-thread blocks; 4 per SM left a quarter of the
# grid to a second wave at batch 512. A constant, not each kernel's occupancy, so that the slices (and so the
# bits of the sums) depend on the shapes and the GPU alone.
BN_BLOCKS_PER_SM = 3


def finalize_blocks(channels):
    """Blocks of FINALIZE_THREADS that bn_sums_finalize needs to add every channel at once: batchnorm.cu's
    slice_lanes(C) lanes per channel, the most (a power of 2, at most 32) with which BN_THREADS threads hold
    every channel. Any grid gives the same sums (the kernel strides over its channels); this one, one pass."""
    lanes = 32
    while lanes > 1 and lanes * channels > BN_THREADS:
        lanes //= 2
    return -(-channels * lanes // FINALIZE_THREADS)


def _relu_operands(y, beta, dy, gamma):
    """(relu, y_or_unused, beta_or_unused) for a BatchNorm backward's optional fused relu: its kernels' ReluMask
    template argument, none without y; with beta as well, the mask recomputed from x (RELU_FROM_INPUT: y is never
    read); else read from y. The kernels take pointers either way and never read the ones their mode does not use
    (dy, gamma stand in)."""
    if y is None:
        return RELU_NONE, dy, gamma
    if beta is not None:
        return RELU_FROM_INPUT, dy, beta
    return RELU_FROM_OUTPUT, y, gamma


def _check_bn_grad_operands(primitive, gamma, saved_mean, saved_invstd, dgamma, dbeta, y, beta, y_name="y"):
    """A BatchNorm backward's per-channel arrays are float32, and beta (the relu's mask from x) comes with y."""
    require_dtype(np.float32, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd,
                   dgamma=dgamma, dbeta=dbeta, **present(beta=beta))
    check_relu_mask(primitive, y, beta, y_name)


class BatchNormPrimitives:
    """CupyBackend's BatchNorm primitives and their launch planning (see the module docstring)."""

    def _channel_geometry(self, x, channels):
        """(C, inner, m): x seen as (outer, C, inner); m = elements per channel."""
        _, c, h, w = self.nchw_dims(x)
        if c != channels:
            raise ValueError(f"activation has {c} channels, BatchNorm parameters {channels}")
        inner = h * w if self.layout == "NCHW" else 1
        return c, inner, element_count(x) // c

    @staticmethod
    def _bn_group(x, channels, inner, arrays):
        """Elements per group of the partial-sum kernels (batchnorm.cu, "Partial-sum tiling"): a 16-byte
        pack when every array read is aligned and no pack straddles two channels, else 1."""
        pack = pack_elements(x.dtype)
        run = channels if inner == 1 else inner         # adjacent elements that share a row (NHWC) or a channel
        return pack if run % pack == 0 and pack_aligned(arrays) else 1

    def _bn_plan(self, channels, m, group, inner):
        """Launch geometry of the partial-sum kernels for C channels of m elements read in groups of
        `group` (see batchnorm.cu). The kernels tell the layouts apart by inner == 1, not by the backend's
        layout: an NCHW activation of 1 x 1 images is laid out as NHWC, and is read as such."""
        nhwc = inner == 1
        key = (channels, m, group, nhwc)
        plan = self._bn_plans.get(key)
        if plan is None:
            groups_per_row = channels // group if nhwc else 1
            cw = min(groups_per_row, BN_THREADS)
            rows = BN_THREADS // cw
            tiles = -(-groups_per_row // cw) if nhwc else channels
            row_steps = -(-(m if nhwc else m // group) // rows)
            wanted = -(-row_steps // MIN_STEPS_PER_THREAD)
            fill_gpu = max(1, BN_BLOCKS_PER_SM * self.kernels.sm_count // tiles)
            slices = max(1, min(wanted, fill_gpu, MAX_SLICES))
            sums_per_thread = group if nhwc else 1          # NCHW adds a group's values before the tree
            plan = dict(cw=cw, grid=(tiles, slices), block=(cw * rows,), slices=slices, vec=int(group > 1),
                        shared_mem=2 * sums_per_thread * cw * rows * 4)
            self._bn_plans[key] = plan
        return plan

    def _bn_one_launch_plan(self, kernel, x, channels, m, inner, reduce_arrays, staged, template_args=None):
        """The geometry of a one-launch pass (kernel: bn_stats_apply or bn_grad_dx, which stage `staged`
        per-channel arrays in shared memory after their grid-wide wait; template_args: the instantiation's, by
        default x's type alone), or None when the two-launch path must run instead (always with bn_launches=2):
        the partial-sum plan with its slices capped so that the GPU holds every block at once (the wait would
        otherwise never end), and dynamic shared memory for the staged arrays too.

        The backward's one launch runs only when the weight gradients do not overlap it (overlap_wgrad
        off): a cuDNN kernel beside it on a side stream could hold SM slots this grid needs while waiting for
        its own blocks (a stream-K GEMM's may), and nothing would ever release either. The forward pass has
        the GPU to itself: nothing runs on the side streams then."""
        if self.bn_launches == 2 or (kernel == "bn_grad_dx" and self.overlap_wgrad):
            return None
        plan = self._bn_plan(channels, m, self._bn_group(x, channels, inner, reduce_arrays), inner)
        shared_mem = max(plan["shared_mem"], staged * channels * 4)
        if shared_mem > MAX_DYNAMIC_SHARED_BYTES:
            return None
        resident = self.kernels.resident_blocks(kernel, template_args or (ctype(x.dtype),), plan["block"][0],
                                                shared_mem)
        tiles, slices = plan["grid"]
        if resident < tiles:
            return None
        slices = min(slices, resident // tiles)
        return dict(plan, grid=(tiles, slices), slices=slices, shared_mem=shared_mem)

    def _bn_partials(self, x, channels, m, inner, arrays):
        """The plan of the partial-sum kernels reading `arrays`, and the scratch it fills."""
        plan = self._bn_plan(channels, m, self._bn_group(x, channels, inner, arrays), inner)
        return plan, self._bn_partials_buffer(plan, channels)

    def _bn_partials_buffer(self, plan, channels):
        """The (2, P, C) float32 scratch of a plan's partial sums."""
        return self._scratch("bn_partials", (2, plan["slices"], channels), np.float32)

    def _bn_arrivals(self):
        """The counters with which a reduction (bn_stats, bn_grad, and the one-launch passes) finds its last
        block, and the one-launch passes' other blocks wait for it.

        Zeroed once; every launch leaves the arrivals at 0 again. One per backend is enough: the reductions run
        one after another on the main stream, and workers sharing a GPU have a backend each.
        """
        arrivals = self._scratch_buffers.get("bn_arrivals")
        if arrivals is None:     # [0]: arrivals; [1]: the one-launch passes' generation (finish_then_release)
            arrivals = self._scratch_buffers["bn_arrivals"] = cupy.zeros((2,), dtype=np.uint32)
        return arrivals

    @staticmethod
    def _apply_operands(x, y, residual):
        """The arrays bn_apply reads or writes per element (the residual checked against x)."""
        if residual is None:
            return x, y
        same_dtype(x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual of shape {residual.shape} for an activation of shape {x.shape}")
        return x, residual, y

    def _bn_apply(self, x, y, mean, stat, gamma, beta, eps, stat_is_variance, relu, residual):
        c, inner, _ = self._channel_geometry(x, gamma.size)
        n = element_count(x)
        operands = self._apply_operands(x, y, residual)
        self._launch_packed("bn_apply", x.dtype, n, operands,
                            (x, x if residual is None else residual, y, mean, stat, gamma, beta, np.float32(eps),
                             i32(stat_is_variance), i32(n), i32(c), i32(inner), i32(residual is not None),
                             i32(relu)))

    @primitive
    def batchnorm_train_forward(self, x, gamma, beta, running_mean, running_var, decay, eps,
                                y, saved_mean, saved_invstd, relu=False, residual=None):
        """y = [relu](gamma * (x - mean) / sqrt(var + eps) + beta [+ residual]) with batch statistics.

        Saves the batch mean and 1/sqrt(var + eps), and updates the moving statistics on the device
        (moving variance with the unbiased m/(m-1) batch variance), as NumpyBackend. Two launches:
        bn_stats (statistics, finalized by its last block) and bn_apply; with bn_launches=1 one,
        bn_stats_apply, where the GPU holds the capped grid (else the two).
        """
        require_dtype(np.float32, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var,
                       saved_mean=saved_mean, saved_invstd=saved_invstd)
        same_dtype(x, y=y)
        c, inner, m = self._channel_geometry(x, gamma.size)
        t = (ctype(x.dtype),)
        plan = self._bn_one_launch_plan("bn_stats_apply", x, c, m, inner, (x,), 4)
        if plan is not None:
            operands = self._apply_operands(x, y, residual)
            partials = self._bn_partials_buffer(plan, c)
            n = element_count(x)
            self.kernels.launch("bn_stats_apply", t, plan["grid"], plan["block"],
                                (x, x if residual is None else residual, y, i32(c), i32(inner), i32(m),
                                 i32(plan["cw"]), partials, self._bn_arrivals(), np.float64(decay), np.float64(eps),
                                 running_mean, running_var, saved_mean, saved_invstd, gamma, beta, i32(n),
                                 i32(residual is not None), i32(relu), i32(plan["vec"]),
                                 i32(pack_aligned(operands))),
                                shared_mem=plan["shared_mem"])
            return y
        plan, partials = self._bn_partials(x, c, m, inner, (x,))
        self.kernels.launch("bn_stats", t, plan["grid"], plan["block"],
                            (x, i32(c), i32(inner), i32(m), i32(plan["cw"]), partials, self._bn_arrivals(),
                             np.float64(decay), np.float64(eps), running_mean, running_var, saved_mean, saved_invstd,
                             i32(plan["vec"])),
                            shared_mem=plan["shared_mem"])
        self._bn_apply(x, y, saved_mean, saved_invstd, gamma, beta, eps, False, relu, residual)
        return y

    def _bn_sums(self, partials_kernel, args, x, channels, sums, read, more_types=()):
        """One split-BN reduction: partials_kernel(*args, cw, partials, vec) then (2, C) float64 sums.

        The reduction stages of the fused path, ending in bn_sums_finalize instead of a fused finalize.
        `read`: the activations the kernel reads per element; template arguments: x's type, then more_types.
        """
        require_dtype(np.float64, sums=sums)
        c, inner, m = self._channel_geometry(x, channels)
        plan, partials = self._bn_partials(x, c, m, inner, read)
        self.kernels.launch(partials_kernel, (ctype(x.dtype), *more_types), plan["grid"], plan["block"],
                            (*args, i32(c), i32(inner), i32(m), i32(plan["cw"]), partials, i32(plan["vec"])),
                            shared_mem=plan["shared_mem"])
        self.kernels.launch("bn_sums_finalize", (), (finalize_blocks(c),), (FINALIZE_THREADS,),
                            (partials, i32(plan["slices"]), i32(c), sums))
        return sums

    @primitive
    def batchnorm_stats(self, x, shift, sums):
        """sums (2, C) float64 <- [sum(x - shift), sum((x - shift)^2)] per channel, as NumpyBackend
        (float32 partials of the shifted values, added in double)."""
        require_dtype(np.float32, shift=shift)
        return self._bn_sums("bn_stats_partials_shifted", (x, shift), x, shift.size, sums, (x,))

    @primitive
    def batchnorm_train_from_sums(self, x, sums, shift, count, gamma, beta, running_mean, running_var, decay, eps,
                                  y, saved_mean, saved_invstd, relu=False, residual=None):
        """Statistics from (global) shifted sums covering `count` elements per channel, then y, as NumpyBackend.
        sums: float64 (sync BN's), or float32 (those a convolution's genstats wrote, conv2d_forward_with_stats).
        One launch (bn_apply_from_sums), or two (bn_stats_from_sums, bn_apply) where shift or sums share memory
        with what is written (sync BN's shift is the moving mean) or C is too large for the one."""
        require_dtype(np.float32, shift=shift, gamma=gamma, beta=beta, running_mean=running_mean,
                       running_var=running_var, saved_mean=saved_mean, saved_invstd=saved_invstd)
        if sums.dtype not in (np.float64, np.float32):
            raise TypeError(f"sums must be float64 or float32, got {sums.dtype}")
        same_dtype(x, y=y)
        c, inner, _ = self._channel_geometry(x, gamma.size)
        outputs = (running_mean, running_var, saved_mean, saved_invstd)
        shared_mem = 2 * c * 4
        aliased = any(overlap(read, out) for read in (shift, sums) for out in outputs + (y,))
        if aliased or shared_mem > MAX_DYNAMIC_SHARED_BYTES:
            # two launches: a shift that is one of the outputs (sync BN's moving mean) would be read by some
            # blocks of the one-launch kernel after its block 0 updated it (sums or shift in y: after other
            # blocks wrote it)
            self._launch_1d("bn_stats_from_sums", (ctype(sums.dtype),), c,
                            (sums, shift, np.float64(count), i32(c), np.float64(decay), np.float64(eps), *outputs))
            self._bn_apply(x, y, saved_mean, saved_invstd, gamma, beta, eps, False, relu, residual)
            return y
        n = element_count(x)
        self._launch_packed("bn_apply_from_sums", x.dtype, n, self._apply_operands(x, y, residual),
                            (x, x if residual is None else residual, y, sums, shift, np.float64(count),
                             np.float64(decay), np.float64(eps), *outputs, gamma, beta, i32(n), i32(c), i32(inner),
                             i32(residual is not None), i32(relu)),
                            more_types=(ctype(sums.dtype),), shared_mem=shared_mem)
        return y

    @primitive
    def batchnorm_infer_forward(self, x, gamma, beta, running_mean, running_var, eps, y, relu=False, residual=None):
        """BatchNorm with the moving statistics (evaluation)."""
        require_dtype(np.float32, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
        same_dtype(x, y=y)
        self._bn_apply(x, y, running_mean, running_var, gamma, beta, eps, True, relu, residual)
        return y

    @primitive
    def batchnorm_backward(self, dy, x, gamma, saved_mean, saved_invstd, dx, dgamma, dbeta, y=None, beta=None):
        """Backward of batchnorm_train_forward; with y (its relu output) the relu backward is fused. With beta
        too (the caller's promise that no residual was added before the relu) the kernels recompute the relu's
        mask from x instead of reading y: the forward's normalized value, with the same rounded operations, is
        > 0 exactly where y is, and y is a whole activation less to read in each pass.

        Two launches: bn_grad (dgamma, dbeta, finalized by its last block) and bn_backward_dx; with
        bn_launches=1 one, bn_grad_dx, where the GPU holds the capped grid and no weight gradient runs beside
        it (else the two: see _bn_one_launch_plan).
        """
        _check_bn_grad_operands("batchnorm_backward", gamma, saved_mean, saved_invstd, dgamma, dbeta, y, beta)
        same_dtype(x, dy=dy, dx=dx, **present(y=y))
        c, inner, m = self._channel_geometry(x, gamma.size)
        n = element_count(x)
        relu, y_or_unused, beta_or_unused = _relu_operands(y, beta, dy, gamma)
        t = (ctype(x.dtype), relu)
        read = (dy, x) if y_or_unused is dy else (dy, x, y)
        staged = 6 if relu == RELU_FROM_INPUT else 5            # bn_grad_dx_staged: beta only to recompute
        plan = self._bn_one_launch_plan("bn_grad_dx", x, c, m, inner, read, staged, t)
        if plan is not None:
            partials = self._bn_partials_buffer(plan, c)
            self.kernels.launch("bn_grad_dx", t, plan["grid"], plan["block"],
                                (dy, x, y_or_unused, saved_mean, saved_invstd, gamma, beta_or_unused, i32(c),
                                 i32(inner), i32(m), i32(plan["cw"]), partials, self._bn_arrivals(), dgamma, dbeta,
                                 dx, i32(n), i32(plan["vec"]), i32(pack_aligned(read + (dx,)))),
                                shared_mem=plan["shared_mem"])
            return dx
        plan, partials = self._bn_partials(x, c, m, inner, read)
        self.kernels.launch("bn_grad", t, plan["grid"], plan["block"],
                            (dy, x, y_or_unused, saved_mean, saved_invstd, gamma, beta_or_unused,
                             i32(c), i32(inner), i32(m), i32(plan["cw"]), partials, self._bn_arrivals(),
                             dgamma, dbeta, i32(plan["vec"])),
                            shared_mem=plan["shared_mem"])
        return self._bn_backward_dx(dy, x, y_or_unused, relu, saved_mean, saved_invstd, gamma, beta_or_unused,
                                    dgamma, dbeta, dx, m)

    def _bn_backward_dx(self, dy, x, y_or_unused, relu, saved_mean, saved_invstd, gamma, beta_or_unused, dgamma,
                        dbeta, dx, count):
        """bn_backward_dx: dx from dgamma and dbeta, the sums over `count` elements per channel (relu, y_or_unused,
        beta_or_unused as _relu_operands gives them)."""
        c, inner, _ = self._channel_geometry(x, gamma.size)
        n = element_count(x)
        read = (dy, x) if y_or_unused is dy else (dy, x, y_or_unused)
        self._launch_packed("bn_backward_dx", x.dtype, n, read + (dx,),
                            (dy, x, y_or_unused, saved_mean, saved_invstd, gamma, beta_or_unused, dgamma, dbeta, dx,
                             i32(n), i32(c), i32(inner), i32(count)), more_types=(relu,))
        return dx

    @primitive
    def batchnorm_backward_dx(self, dy, x, gamma, saved_mean, saved_invstd, dgamma, dbeta, dx, y=None, beta=None):
        """The rest of batchnorm_backward once dgamma and dbeta hold its sums (relu_backward_add_bn_grad wrote them
        with the gradient dy): dx alone, one launch (bn_backward_dx). y and beta as batchnorm_backward's."""
        _check_bn_grad_operands("batchnorm_backward_dx", gamma, saved_mean, saved_invstd, dgamma, dbeta, y, beta)
        same_dtype(x, dy=dy, dx=dx, **present(y=y))
        _, _, m = self._channel_geometry(x, gamma.size)
        relu, y_or_unused, beta_or_unused = _relu_operands(y, beta, dy, gamma)
        return self._bn_backward_dx(dy, x, y_or_unused, relu, saved_mean, saved_invstd, gamma, beta_or_unused,
                                    dgamma, dbeta, dx, m)

    @primitive
    def relu_backward_add_bn_grad(self, dy, y, addend, dx, bn_x, gamma, saved_mean, saved_invstd, dgamma, dbeta,
                                  bn_y=None, beta=None):
        """dx = relu_backward_add(dy, y, addend), and in the same pass the dgamma and dbeta that
        batchnorm_backward(dx, bn_x, gamma, saved_mean, saved_invstd, ..., y=bn_y, beta=beta) would write: the sums
        of the BatchNorm whose output's gradient dx is (--residual-grad-sums); batchnorm_backward_dx then finishes
        that BatchNorm's backward. One launch, relu_backward_add_bn_grad, in bn_grad's tiling. dx may be addend,
        and no other operand."""
        _check_bn_grad_operands("relu_backward_add_bn_grad", gamma, saved_mean, saved_invstd, dgamma, dbeta, bn_y,
                                beta, y_name="bn_y")
        same_dtype(bn_x, dy=dy, y=y, addend=addend, dx=dx, **present(bn_y=bn_y))
        operands = dict(dy=dy, y=y, addend=addend, bn_x=bn_x, **present(bn_y=bn_y))
        for name, array in operands.items():
            if array.shape != dx.shape:
                raise ValueError(f"relu_backward_add_bn_grad: {name} {array.shape} for a gradient of {dx.shape}")
            if name != "addend" and overlap(array, dx):
                raise ValueError(f"relu_backward_add_bn_grad: dx shares memory with {name} (only addend may be dx)")
        c, inner, m = self._channel_geometry(bn_x, gamma.size)
        relu, y_or_unused, beta_or_unused = _relu_operands(bn_y, beta, dy, gamma)
        read = (dy, y, addend, dx, bn_x) + (() if y_or_unused is dy else (bn_y,))
        plan, partials = self._bn_partials(bn_x, c, m, inner, read)
        self.kernels.launch("relu_backward_add_bn_grad", (ctype(bn_x.dtype), relu), plan["grid"], plan["block"],
                            (dy, y, addend, dx, bn_x, y_or_unused, saved_mean, saved_invstd, gamma, beta_or_unused,
                             i32(c), i32(inner), i32(m), i32(plan["cw"]), partials, self._bn_arrivals(),
                             dgamma, dbeta, i32(plan["vec"])),
                            shared_mem=plan["shared_mem"])
        return dx

    @primitive
    def batchnorm_backward_sums(self, dy, x, y, saved_mean, saved_invstd, sums):
        """sums (2, C) float64 <- [sum(dz), sum(dz * xhat)] per channel (y: the fused relu's output or None)."""
        require_dtype(np.float32, saved_mean=saved_mean, saved_invstd=saved_invstd)
        same_dtype(x, **present(dy=dy, y=y))
        relu, y_or_unused, unused = _relu_operands(y, None, dy, saved_mean)    # sync BN reads the mask from y
        return self._bn_sums("bn_grad_partials", (dy, x, y_or_unused, saved_mean, saved_invstd, unused, unused),
                             x, saved_mean.size, sums, (dy, x, y_or_unused), more_types=(relu,))

    @primitive
    def batchnorm_backward_from_sums(self, dy, x, y, gamma, saved_mean, saved_invstd, sums, count,
                                     dx, dgamma, dbeta):
        """dbeta, dgamma <- sums; dx from sums covering `count` elements per channel, as NumpyBackend
        (bn_backward_dx reads dgamma/dbeta and scales them by 1/count, exactly its fused-path use)."""
        require_dtype(np.float32, gamma=gamma, saved_mean=saved_mean, saved_invstd=saved_invstd,
                       dgamma=dgamma, dbeta=dbeta)
        require_dtype(np.float64, sums=sums)
        same_dtype(x, **present(dy=dy, dx=dx, y=y))
        c, _, _ = self._channel_geometry(x, gamma.size)
        self._launch_1d("bn_grad_from_sums", (), c, (sums, i32(c), dgamma, dbeta))
        relu, y_or_unused, unused = _relu_operands(y, None, dy, gamma)
        return self._bn_backward_dx(dy, x, y_or_unused, relu, saved_mean, saved_invstd, gamma, unused, dgamma, dbeta,
                                    dx, count)
