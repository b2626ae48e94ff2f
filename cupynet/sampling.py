"""Which images, crops and flips each training step sees, as a pure function of (seed, step).

Every random choice of the input pipeline is derived from the seed and the global step, never from a
stateful generator:
  * each epoch visits the training set in its own permutation, `epoch_order(seed, epoch, n)`;
    step s uses rows [pos * B, (pos + 1) * B) of epoch s // steps_per_epoch, pos = s % steps_per_epoch
    (the incomplete last batch of an epoch is dropped, as steps_per_epoch = n // B);
  * crop offsets and flips come from a counter-based hash of (seed, step, row): `crop_flip_draws`.
    The GPU kernel (kernels/augment.cu) computes the same 32-bit hash, so both backends
    see identical batches, a resumed run continues exactly where it stopped, and the GPU needs no host
    data per step.
"""
import numpy as np

# lowbias32 (Chris Wellons' hash-prospector): a cheap, well-mixed 32-bit integer hash.
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9   # decorrelates the seed, step and row streams


def mix32(x):
    """lowbias32 on a uint32 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(_MIX1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_MIX2)
    x ^= x >> np.uint32(16)
    return x


def step_key(seed, step):
    """One 32-bit key per (seed, step)."""
    seed_part = mix32(np.uint32(seed & 0xFFFFFFFF) ^ np.uint32(_GOLDEN))
    return mix32(seed_part ^ mix32(np.uint32(step & 0xFFFFFFFF)))


def crop_flip_draws(seed, step, batch, num_offsets, first_row=0):
    """Per row of the batch: (dy, dx) crop offsets in [0, num_offsets) and a flip flag.

    One 32-bit hash per row: dy = h % k, dx = (h // k) % k, flip = (h // k^2) & 1 with k = num_offsets.
    The rows hashed are first_row .. first_row + batch - 1, positions in the step's global batch: a
    data-parallel worker whose shard starts at global row `first_row` draws exactly what the single
    worker draws for those rows.
    """
    positions = np.arange(batch, dtype=np.uint64) + np.uint64(first_row)
    rows = (positions & np.uint64(0xFFFFFFFF)).astype(np.uint32) * np.uint32(_GOLDEN)
    h = mix32(rows ^ step_key(seed, step))
    k = np.uint32(num_offsets)
    dy = (h % k).astype(np.int64)
    dx = ((h // k) % k).astype(np.int64)
    flip = ((h // (k * k)) & np.uint32(1)).astype(bool)
    return dy, dx, flip


def epoch_order(seed, epoch, num_images):
    """The permutation of the training set used in `epoch` (int64 indices)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


class StepSampler:
    """Maps a global step to its epoch's order and to the dataset rows of its batch (host arrays).

    The trainer uploads `order(epoch)` into one device buffer when an epoch starts; a training step
    then reads its rows from that buffer on the device (at the step counter's position), so no
    per-step host-to-device copy is needed and a captured step can replay. `rows` is the same
    selection on the host, for tests and for the reference.
    """

    def __init__(self, seed, num_images, batch_size):
        self.seed = seed
        self.num_images = num_images
        self.batch_size = batch_size
        self.steps_per_epoch = num_images // batch_size
        self._epoch, self._order = None, None

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def order(self, epoch):
        """The permutation of the training set used in `epoch` (int64), cached for the current epoch."""
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.seed, epoch, self.num_images)
        return self._order

    def rows(self, step):
        """Dataset rows of the batch of `step` (B,), int64."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
