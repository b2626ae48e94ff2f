"""Training runs the capture tests compare (test_step_graph_gpu.py, test_step_options_gpu.py).

Each case trains the same model twice from the same seed, once eagerly (--cuda-graph off) and once
captured (--cuda-graph on: two eager warm-up steps, then one recording replayed), over several epoch
starts (a new order uploaded between replays) and a learning-rate change (the device scalar set between
replays), with evaluations in between as --eval-interval runs them (they reuse the training buffers of the
same shape, and with a communicator average the moving statistics for the evaluation and put each replica's own
back: a replay must not be corrupted by them). Both runs launch the same kernels in the same order on the same data with
deterministic cuDNN engines, so every parameter, momentum and moving statistic must be equal exactly.
"""
import numpy as np
import pytest

from cupynet.data import synthetic_dataset
from cupynet.trainer import Trainer

STEPS = 12
# 64 images at batch 16: 4 steps per epoch, so 12 steps start 3 epochs; the LR drops after 1.5 epochs.
BASE = dict(num_layers=8, train_batch_size=16, eval_batch_size=16, bn_decay=0.9, seed=4,
            lr_values=(0.1, 0.02), lr_boundaries=(1.5,))


def small_dataset():
    """64 training and 24 test images (each test module's `dataset` fixture)."""
    return synthetic_dataset(num_train=64, num_test=24, seed=1)


def make_backend(layout, dtype, tf32=True, wgrad_streams=1, wgrad_chunks=1, bn_launches=2, split_k=False,
                 conv_genstats=False, pixel_pairs=False, residual_grad_sums=False, wgrad_pixel_pairs=False,
                 stream_priorities=False, tune_in_graph=False, padded_input=False, programmatic_launch=False,
                 programmatic_launch_early=False, own_conv_channels=0):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes", reason="bfloat16 on the GPU needs ml_dtypes (CuPy's bfloat16 dtype)")
    from cupynet.backends.cupy_backend import CupyBackend
    return CupyBackend(0, layout, dtype, tf32=tf32, wgrad_streams=wgrad_streams, wgrad_chunks=wgrad_chunks,
                       bn_launches=bn_launches, split_k=split_k, conv_genstats=conv_genstats,
                       pixel_pairs=pixel_pairs, residual_grad_sums=residual_grad_sums,
                       wgrad_pixel_pairs=wgrad_pixel_pairs, stream_priorities=stream_priorities,
                       tune_in_graph=tune_in_graph, padded_input=padded_input,
                       programmatic_launch=programmatic_launch,
                       programmatic_launch_early=programmatic_launch_early,
                       own_conv_channels=own_conv_channels)


def train(config, dataset, backend, comm=None, evaluate_every=5):
    """STEPS steps with an evaluation every `evaluate_every`; (trainer, state arrays, evaluations, losses)."""
    trainer = Trainer(config, dataset, backend, comm)
    evaluations, losses = [], []
    for _ in range(STEPS):
        trainer.train_step()
        if trainer.step % evaluate_every == 0:
            evaluations.append(trainer.evaluate_during_training(dataset.test))   # with a comm: mean statistics
            losses.append(trainer.take_mean_loss())
    return trainer, trainer.checkpoint_arrays(), evaluations, losses


def assert_identical(eager, captured):
    _, eager_state, eager_evals, eager_losses = eager
    _, state, evals, losses = captured
    for name, value in eager_state.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert evals == eager_evals
    assert losses == eager_losses
