"""Trainer: one model replica, its optimizer and its input pipeline on one backend.

It owns the training step (next batch -> forward/backward -> momentum-SGD update), evaluation over a whole
split, and the conversion of its state to and from checkpoint arrays. `cupynet/train.py` drives it.

    trainer = Trainer(config, dataset, backend)
    trainer.restore(*load_checkpoint(path))       # optional
    while trainer.step < config.train_steps:
        trainer.train_step()
    result = trainer.evaluate(dataset.test)

Per step, the host only picks the batch's dataset rows and sets the learning rate; the loss is summed
on the backend and read at logging intervals (`take_mean_loss`), so a GPU step needs no host sync.

Data parallelism: given a communicator (cupynet/parallel.py), the trainer is one replica of several.
It trains on its shard of the step's global batch (rows [rank * b, (rank + 1) * b) of
`sampler.rows(step)`, b = global batch / size), averages the gradient across the replicas before the
identical update, and evaluates its slice of the split. Each replica's BatchNorm normalizes with its
own shard's statistics (the reference's towers); `average_moving_statistics` averages the moving
statistics, which the driver calls before every evaluation and checkpoint. With `config.sync_bn`, the
BatchNorm layers all-reduce their statistics instead (cupynet/layers.py), so training equals one device
with the global batch and the moving statistics stay identical (averaging them is then a no-op).
Without a communicator (one device) every collective is skipped and the trainer is exactly the single-worker one.

    trainer = Trainer(config, dataset, backend, comm)
    trainer.broadcast_state()            # after init and after a restore: replicas start identical
"""
import numpy as np

from cupynet import __version__
from cupynet.errors import CheckpointError
from cupynet.checkpoint import check_compatible
from cupynet.model import ResNet
from cupynet.optim import MomentumSGD, PiecewiseConstant
from cupynet.sampling import StepSampler

COMPATIBILITY_KEYS = ("num_layers", "block", "num_classes", "dataset")


class Trainer:
    def __init__(self, config, dataset, backend, comm=None):
        self.config = config
        self.comm = comm
        rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
        self.shard_size = config.train_batch_size // size     # config validation: divisible
        self.first_row = rank * self.shard_size                # this shard's position in the global batch
        self.be = be = backend
        self.seed = config.seed
        # --sync-bn: BatchNorm statistics over the global batch; alone (or one worker) there is nothing to sync.
        bn_comm = comm if config.sync_bn and comm is not None and comm.size > 1 else None
        self.model = ResNet(be, config.num_layers, config.block, config.bn_decay, config.bn_epsilon,
                            bn_comm=bn_comm)
        self.model.init(np.random.default_rng(config.seed))
        self.optimizer = MomentumSGD(be, self.model.params, config.momentum, config.weight_decay)

        self.train_split = self._upload(dataset.train)
        self.sampler = StepSampler(config.seed, len(dataset.train), config.train_batch_size, be.from_host)
        self.schedule = PiecewiseConstant.from_epochs(config.lr_boundaries, config.lr_values,
                                                      self.sampler.steps_per_epoch)
        batch = self.shard_size
        self.x = be.empty(be.activation_shape(batch, 3, 32, 32))    # x: the step's normalized images
        self.labels = be.empty((batch,), dtype=np.int32)
        self.loss_sum = be.zeros((), dtype=be.param_dtype)         # summed on the device between logs
        self.loss_steps = 0
        self.step = 0
        self._eval_buffers = {}
        self._eval_splits = {}

    def _upload(self, split):
        """The split's uint8 images and labels as backend arrays (once; never per step)."""
        return self.be.from_host(split.images), self.be.from_host(split.labels.astype(np.int32))

    # ----------------------------------------------------------------- training

    @property
    def epoch(self):
        return self.step / self.sampler.steps_per_epoch

    @property
    def learning_rate(self):
        return self.schedule(self.step)

    def train_step(self):
        """Advance one step: batch `self.step` of the sampler, forward/backward, update."""
        loss = self.compute_gradients()
        self.optimizer.set_learning_rate(self.learning_rate)
        self.optimizer.step()
        self.be.accumulate(self.loss_sum, loss, 1.0)
        self.loss_steps += 1
        self.step += 1

    def compute_gradients(self):
        """This replica's shard of step `self.step` -> params.grad_flat (averaged over the replicas).

        Returns the shard's 0-d mean loss. Every replica ends with the same gradient: the mean of the
        shards' gradients, which is the gradient of the global batch's mean loss (equal shards).
        """
        be, c = self.be, self.config
        images, labels = self.train_split
        rows = self.sampler.rows(self.step)[self.first_row:self.first_row + self.shard_size]   # (b,)
        be.augment_batch(images, labels, rows, self.seed, self.step, c.distortion, self.x, self.labels,
                         first_row=self.first_row)
        loss = self.model.forward_backward(self.x, self.labels)
        if self.comm is not None:
            self.comm.all_reduce_mean(self.model.params.grad_flat)
        return loss

    def take_mean_loss(self):
        """Mean training cross-entropy since the last call (a host read: only at logging intervals).

        With replicas, a collective: the mean over the replicas' shards, i.e. over the global batches.
        """
        if self.comm is not None:
            self.comm.all_reduce_mean(self.loss_sum)
        mean = float(self.be.to_host(self.loss_sum)) / max(self.loss_steps, 1)
        self.be.fill(self.loss_sum, 0)
        self.loss_steps = 0
        return mean

    def l2_penalty(self):
        """0.5 * weight_decay * ||v||^2, the regularization part of the reference's total loss (a host read)."""
        return float(self.be.to_host(self.optimizer.l2_penalty()))

    # ----------------------------------------------------------------- replicas

    def broadcast_state(self, root=0):
        """Parameters, BN moving statistics and momentum <- rank `root`'s (a collective; no-op alone)."""
        if self.comm is None:
            return
        for flat in self._state_buffers():
            self.comm.broadcast(flat, root)
        self.model.params.sync_compute_copy()

    def average_moving_statistics(self):
        """BN moving statistics <- their mean over the replicas (a collective; no-op alone)."""
        if self.comm is not None:
            self.comm.all_reduce_mean(self.model.state.flat)

    def _state_buffers(self):
        return self.model.params.flat, self.model.state.flat, self.optimizer.accumulator

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, split):
        """Accuracy and mean cross-entropy over every image of `split`, each counted exactly once.

        Batches of eval_batch_size; the last one is simply smaller when the size does not divide the
        split (layers keep a buffer per shape, so this costs one more set of buffers, not a copy).
        With replicas, a collective: each evaluates its contiguous slice of the split and the counts
        and loss sums are added up across them.
        """
        be, model = self.be, self.model
        if id(split) not in self._eval_splits:          # uploaded once, reused by later evaluations
            self._eval_splits[id(split)] = self._upload(split)
        images, labels = self._eval_splits[id(split)]
        n = len(split)
        first, end = self._eval_slice(n)
        correct = be.zeros((), dtype=np.int64)
        loss_total = be.zeros((), dtype=be.param_dtype)
        for start in range(first, end, self.config.eval_batch_size):
            count = min(self.config.eval_batch_size, end - start)
            x, y = self._eval_batch_buffers(count)
            rows = be.from_host(np.arange(start, start + count))
            be.augment_batch(images, labels, rows, self.seed, 0, False, x, y)
            logits = model.forward(x, train=False)
            be.accumulate(loss_total, model.loss_layer.forward(logits, y), count)
            be.count_correct(logits, y, count, correct)
        if self.comm is not None:
            self.comm.all_reduce_sum(correct)
            self.comm.all_reduce_sum(loss_total)
        num_correct = int(be.to_host(correct))
        return {"accuracy": num_correct / n, "correct": num_correct, "images": n,
                "loss": float(be.to_host(loss_total)) / n}

    def _eval_slice(self, n):
        """[first, end) of the split's n images for this replica: contiguous, disjoint, covering all."""
        if self.comm is None:
            return 0, n
        rank, size = self.comm.rank, self.comm.size
        return rank * n // size, (rank + 1) * n // size

    def _eval_batch_buffers(self, count):
        if count not in self._eval_buffers:
            be = self.be
            self._eval_buffers[count] = (be.empty(be.activation_shape(count, 3, 32, 32)),
                                         be.empty((count,), dtype=np.int32))
        return self._eval_buffers[count]

    # ----------------------------------------------------------------- checkpoints

    def checkpoint_arrays(self):
        """Parameters, BN moving statistics and momentum as canonical NumPy arrays."""
        params = self.model.params
        arrays = params.state_dict("params/")
        arrays.update(self.model.state.state_dict("bn/"))
        arrays.update(params.state_dict("momentum/", flat=self.optimizer.accumulator))
        return arrays

    def checkpoint_meta(self):
        meta = dict(self.model.architecture, dataset=self.config.dataset_kind)
        meta.update(cupynet_version=__version__, config=self.config.to_dict(),
                    # All randomness after initialization is a pure function of (seed, step):
                    # restoring the seed and the step restores the RNG state exactly.
                    rng={"kind": "counter-based (seed, step)", "seed": self.seed},
                    layout=self.be.layout, dtype=str(self.be.dtype))
        return meta

    def restore(self, arrays, meta, source):
        """Load a checkpoint's state; refuse one written for another architecture or dataset."""
        expected = dict(self.model.architecture, dataset=self.config.dataset_kind)
        check_compatible(meta, expected, COMPATIBILITY_KEYS)
        try:
            self.model.params.load_state_dict(arrays, "params/")
            self.model.state.load_state_dict(arrays, "bn/")
            self.model.params.load_state_dict(arrays, "momentum/", flat=self.optimizer.accumulator)
            self.step = int(meta["step"])
            self.seed = int(meta["rng"]["seed"])
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"{source}: does not hold this model's state ({type(error).__name__}: {error})")
        self.sampler = StepSampler(self.seed, self.sampler.num_images, self.sampler.batch_size, self.be.from_host)
