"""Trainer: one model replica, its optimizer and its input pipeline on one backend.

It owns the training step (next batch -> forward/backward -> momentum-SGD update), evaluation over a whole
split, and the conversion of its state to and from checkpoint arrays. `cupynet/train.py` drives it.

    trainer = Trainer(config, dataset, backend)
    arrays, meta = load_checkpoint(path)          # optional: resume
    trainer.restore(arrays, meta, os.path.basename(path))
    while trainer.step < config.train_steps:
        trainer.train_step()
    result = trainer.evaluate(dataset.test)

A step is split in two. The host part (`_prepare_step`) uploads the epoch's order of the training set
when an epoch starts and sets the learning-rate scalar when the schedule changes it: usually nothing.
The device part (`_device_step`) reads the step number from a device counter, draws its batch from the
uploaded order, runs forward/backward, [all-reduces the gradient,] updates, adds the loss to a device
sum and advances the counter: it never waits for the host, so on a GPU it is recorded once as a CUDA
graph and replayed (cupynet/step_graph.py; `--cuda-graph auto|on|off`). The loss sum is read only at
logging intervals (`take_mean_loss`).

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
from cupynet.errors import CheckpointError, ConfigError
from cupynet.checkpoint import check_compatible, check_training_state
from cupynet.model import ResNet
from cupynet.optim import MomentumSGD, PiecewiseConstant
from cupynet.sampling import StepSampler
from cupynet.step_graph import StepRunner

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
                            bn_comm=bn_comm, conv_init=config.conv_init)
        self.model.init(np.random.default_rng(config.seed))
        self.optimizer = MomentumSGD(be, self.model.params, config.momentum, config.weight_decay)

        self.train_split = self._upload(dataset.train)
        self.sampler = StepSampler(config.seed, len(dataset.train), config.train_batch_size)
        self.schedule = PiecewiseConstant.from_epochs(config.lr_boundaries, config.lr_values,
                                                      self.sampler.steps_per_epoch)
        batch = self.shard_size
        self.x = be.empty(be.input_shape(batch, 3, 32, 32))    # x: the step's normalized images
        self.labels = be.empty((batch,), dtype=np.int32)
        self.loss_sum = be.zeros((), dtype=be.param_dtype)         # summed on the device between logs
        self.loss_steps = 0
        self.step = 0                                              # the host's copy of step_counter
        self.step_counter = be.zeros((), dtype=np.int64)           # the step the device is at
        self.order = be.empty((len(dataset.train),), dtype=np.int64)   # the current epoch's permutation
        self._order_epoch = None        # which epoch's permutation `order` holds
        self._lr_on_device = None       # the value in the optimizer's learning-rate scalar
        self.runner = StepRunner(be, capture=use_cuda_graph(config, be, comm), wait_for_peers=self._peers())
        self._eval_buffers = {}
        self._eval_splits = {}

    def _peers(self):
        return self.comm.wait_for_peers if self.comm is not None else None

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
        self._prepare_step()
        self.runner(self._device_step)
        self.loss_steps += 1
        self.step += 1

    def _prepare_step(self):
        """The host's part of a step, between device steps: the epoch's order when an epoch starts,
        the learning rate when the schedule changes it (both enqueued on the backend, no sync)."""
        epoch = self.sampler.epoch_of(self.step)
        if epoch != self._order_epoch:
            self.be.upload_into(self.order, self.sampler.order(epoch))
            self._order_epoch = epoch
        rate = self.learning_rate
        if rate != self._lr_on_device:
            self.optimizer.set_learning_rate(rate)
            self._lr_on_device = rate

    def _device_step(self):
        """The device's part: recorded once as a CUDA graph when capturing, so no host values may vary."""
        loss = self._shard_gradients()
        self.optimizer.step()
        self.be.accumulate(self.loss_sum, loss, 1.0)
        self.be.advance_step(self.step_counter)

    def compute_gradients(self):
        """This replica's shard of step `self.step` -> params.grad_flat (averaged over the replicas).

        Returns the shard's 0-d mean loss. Every replica ends with the same gradient: the mean of the
        shards' gradients, which is the gradient of the global batch's mean loss (equal shards).
        """
        self._prepare_step()
        return self._shard_gradients()

    def _shard_gradients(self):
        be, c = self.be, self.config
        images, labels = self.train_split
        # Rows [first_row, first_row + shard) of the global batch at the device counter's step.
        be.augment_train_batch(images, labels, self.order, self.step_counter, self.sampler.steps_per_epoch,
                               c.train_batch_size, self.first_row, self.seed, c.distortion, self.x, self.labels)
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
            every_row = be.from_host(np.arange(len(split), dtype=np.int64))
            self._eval_splits[id(split)] = self._upload(split) + (every_row,)
        images, labels, every_row = self._eval_splits[id(split)]
        n = len(split)
        first, end = self._eval_slice(n)
        correct = be.zeros((), dtype=np.int64)
        loss_total = be.zeros((), dtype=be.param_dtype)
        with be.evaluating():           # the GPU's convolutions of new shapes: untimed, alike in every process
            for start in range(first, end, self.config.eval_batch_size):
                count = min(self.config.eval_batch_size, end - start)
                x, y = self._eval_batch_buffers(count)
                be.augment_batch(images, labels, every_row[start:start + count], self.seed, 0, False, x, y)
                logits = model.forward(x, train=False)
                be.accumulate(loss_total, model.loss_layer.forward(logits, y), count)
                be.count_correct(logits, y, count, correct)
        if self.comm is not None:
            self.comm.all_reduce_sum(correct)
            self.comm.all_reduce_sum(loss_total)
        num_correct = int(be.to_host(correct))
        return {"accuracy": num_correct / n, "correct": num_correct, "images": n,
                "loss": float(be.to_host(loss_total)) / n}

    def evaluate_during_training(self, split):
        """evaluate(split) between two training steps, with the replicas' mean moving statistics as the final
        evaluation has them; each replica's own are put back after it, so training goes on exactly as it would
        without the evaluation (alone, nothing to average or put back)."""
        own = None
        if self.comm is not None:
            own = self.be.empty(self.model.state.flat.shape, dtype=self.model.state.flat.dtype)
            self.be.copy_into(own, self.model.state.flat)
        self.average_moving_statistics()
        result = self.evaluate(split)
        if own is not None:
            self.be.copy_into(self.model.state.flat, own)
        return result

    def _eval_slice(self, n):
        """[first, end) of the split's n images for this replica: contiguous, disjoint, covering all."""
        if self.comm is None:
            return 0, n
        rank, size = self.comm.rank, self.comm.size
        return rank * n // size, (rank + 1) * n // size

    def _eval_batch_buffers(self, count):
        if count not in self._eval_buffers:
            be = self.be
            self._eval_buffers[count] = (be.empty(be.input_shape(count, 3, 32, 32)),
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
        meta.update(cupynet_version=__version__, config=self.config.to_dict(), train_images=self.sampler.num_images,
                    # All randomness after initialization is a pure function of (seed, step):
                    # restoring the seed and the step restores the RNG state exactly.
                    rng={"kind": "counter-based (seed, step)", "seed": self.seed},
                    layout=self.be.layout, dtype=str(self.be.dtype))
        engines = self.be.conv_engine_choices()          # GPU: the autotuned cuDNN engines (CPU: None)
        if engines is not None:
            meta["conv_engines"] = engines
        return meta

    def check_restorable(self, meta, way_out="use another --model-dir"):
        """Refuse (CheckpointError, ending with `way_out`) a checkpoint written for another architecture or dataset."""
        expected = dict(self.model.architecture, dataset=self.config.dataset_kind)
        check_compatible(meta, expected, COMPATIBILITY_KEYS, way_out)

    def restore(self, arrays, meta, source):
        """Load a checkpoint's state; refuse one written for another architecture or dataset."""
        self.check_restorable(meta)
        check_training_state(source, arrays)
        try:
            self.model.params.load_state_dict(arrays, "params/")
            self.model.state.load_state_dict(arrays, "bn/")
            self.model.params.load_state_dict(arrays, "momentum/", flat=self.optimizer.accumulator)
            self.step = int(meta["step"])
            self.seed = int(meta["rng"]["seed"])
            if not 0 <= self.seed < 2**32:           # as --seed
                raise ValueError(f"its seed {self.seed} is not from 0 to {2**32 - 1}")
        except (KeyError, ValueError, TypeError) as error:
            raise CheckpointError(f"{source}: does not hold this model's state ({type(error).__name__}: {error})")
        self.sampler = StepSampler(self.seed, self.sampler.num_images, self.sampler.batch_size)
        self.be.fill(self.step_counter, self.step)
        self._order_epoch = self._lr_on_device = None
        self.be.adopt_conv_engine_choices(meta.get("conv_engines"))   # same engines: continues exactly
        # A recording made before would replay the old seed: record again after the warm-up steps.
        self.runner = StepRunner(self.be, capture=self.runner.capture, wait_for_peers=self._peers())


def use_cuda_graph(config, backend, comm=None):
    """Whether the trainer records its device step as a CUDA graph: --cuda-graph on, or auto on a GPU.

    Capture needs the GPU backend and a communicator that enqueues on the device (NCCL), not the
    host all-reduce, which waits for the device in the middle of the step.
    """
    mode = config.cuda_graph
    if mode == "off":
        return False
    possible = backend.name == "cupy" and (comm is None or comm.capturable)
    if mode == "on" and not possible:
        why = "the CPU backend has no CUDA graphs" if backend.name != "cupy" else \
            f"the {comm.kind} all-reduce waits for the device inside the step (use --reduce nccl)"
        raise ConfigError(f"--cuda-graph on: cannot capture the training step: {why}")
    return possible
