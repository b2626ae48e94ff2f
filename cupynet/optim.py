"""Momentum SGD with weight decay over the flat parameter buffer, and the piecewise learning rate.

The update is the reference's (TensorFlow MomentumOptimizer on a loss that includes
0.5 * weight_decay * ||v||^2 for every trainable variable v):
    accumulator = momentum * accumulator + (grad + weight_decay * v)
    v -= lr * accumulator
One backend call updates every parameter at once; the learning rate is a 0-d backend array that the
host sets between steps, so a GPU step never waits on the host.

    opt = MomentumSGD(backend, model.params, momentum=0.9, weight_decay=1e-4)
    schedule = PiecewiseConstant(boundaries_in_steps, values)
    opt.set_learning_rate(schedule(step)); opt.step()
"""
import bisect


class PiecewiseConstant:
    """values[i] for boundaries[i-1] <= step < boundaries[i] (boundaries in steps, increasing)."""

    def __init__(self, boundaries, values):
        if len(values) != len(boundaries) + 1:
            raise ValueError("need exactly one more value than boundaries")
        self.boundaries = list(boundaries)
        self.values = list(values)

    @classmethod
    def from_epochs(cls, boundary_epochs, values, steps_per_epoch):
        """Boundaries given in epochs, converted with the actual epoch length (as the reference)."""
        return cls([int(round(e * steps_per_epoch)) for e in boundary_epochs], values)

    def __call__(self, step):
        return self.values[bisect.bisect_right(self.boundaries, step)]


class MomentumSGD:
    """Momentum SGD + L2 weight decay over a ParamStore's flat buffers."""

    def __init__(self, backend, params, momentum, weight_decay):
        self.be = backend
        self.params = params
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.accumulator = backend.zeros((params.total,), dtype=backend.param_dtype)
        self.learning_rate = backend.zeros((), dtype=backend.param_dtype)   # device scalar
        self._squares = backend.zeros((), dtype=backend.param_dtype)
        self._penalty = backend.zeros((), dtype=backend.param_dtype)

    def set_learning_rate(self, value):
        self.be.fill(self.learning_rate, value)

    def step(self):
        self.be.sgd_momentum_update(self.params.flat, self.params.grad_flat, self.accumulator,
                                    self.learning_rate, self.momentum, self.weight_decay,
                                    compute_copy=self.params.compute_flat)

    def l2_penalty(self):
        """0.5 * weight_decay * ||v||^2 over every trainable variable, as a 0-d backend array."""
        self.be.fill(self._penalty, 0)
        self.be.sum_of_squares(self.params.flat, self._squares)
        self.be.accumulate(self._penalty, self._squares, 0.5 * self.weight_decay)
        return self._penalty
