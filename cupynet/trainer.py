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
    def __init__(self, config, dataset, backend):
        self.config = config
        self.be = be = backend
        self.seed = config.seed
        self.model = ResNet(be, config.num_layers, config.block, config.bn_decay, config.bn_epsilon)
        self.model.init(np.random.default_rng(config.seed))
        self.optimizer = MomentumSGD(be, self.model.params, config.momentum, config.weight_decay)

        self.train_split = self._upload(dataset.train)
        self.sampler = StepSampler(config.seed, len(dataset.train), config.train_batch_size, be.from_host)
        self.schedule = PiecewiseConstant.from_epochs(config.lr_boundaries, config.lr_values,
                                                      self.sampler.steps_per_epoch)
        batch = config.train_batch_size
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
        be, c = self.be, self.config
        images, labels = self.train_split
        rows = self.sampler.rows(self.step)
        be.augment_batch(images, labels, rows, self.seed, self.step, c.distortion, self.x, self.labels)
        loss = self.model.forward_backward(self.x, self.labels)
        self.optimizer.set_learning_rate(self.learning_rate)
        self.optimizer.step()
        self.be.accumulate(self.loss_sum, loss, 1.0)
        self.loss_steps += 1
        self.step += 1

    def take_mean_loss(self):
        """Mean training cross-entropy since the last call (a host read: only at logging intervals)."""
        mean = float(self.be.to_host(self.loss_sum)) / max(self.loss_steps, 1)
        self.be.fill(self.loss_sum, 0)
        self.loss_steps = 0
        return mean

    def l2_penalty(self):
        """0.5 * weight_decay * ||v||^2, the regularization part of the reference's total loss (a host read)."""
        return float(self.be.to_host(self.optimizer.l2_penalty()))

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, split):
        """Accuracy and mean cross-entropy over every image of `split`, each counted exactly once.

        Batches of eval_batch_size; the last one is simply smaller when the size does not divide the
        split (layers keep a buffer per shape, so this costs one more set of buffers, not a copy).
        """
        be, model = self.be, self.model
        if id(split) not in self._eval_splits:          # uploaded once, reused by later evaluations
            self._eval_splits[id(split)] = self._upload(split)
        images, labels = self._eval_splits[id(split)]
        n = len(split)
        correct = be.zeros((), dtype=np.int64)
        loss_total = be.zeros((), dtype=be.param_dtype)
        for start in range(0, n, self.config.eval_batch_size):
            count = min(self.config.eval_batch_size, n - start)
            x, y = self._eval_batch_buffers(count)
            rows = be.from_host(np.arange(start, start + count))
            be.augment_batch(images, labels, rows, self.seed, 0, False, x, y)
            logits = model.forward(x, train=False)
            be.accumulate(loss_total, model.loss_layer.forward(logits, y), count)
            be.count_correct(logits, y, count, correct)
        num_correct = int(be.to_host(correct))
        return {"accuracy": num_correct / n, "correct": num_correct, "images": n,
                "loss": float(be.to_host(loss_total)) / n}

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
