"""Batch order and augmentation draws: pure functions of (seed, step)."""
import numpy as np

from cupynet.sampling import StepSampler, crop_flip_draws, epoch_order


def test_an_epoch_visits_each_image_at_most_once_and_drops_the_remainder():
    sampler = StepSampler(seed=3, num_images=100, batch_size=16)
    assert sampler.steps_per_epoch == 6
    rows = np.concatenate([sampler.rows(step) for step in range(6)])
    assert len(rows) == 96 and len(set(rows.tolist())) == 96 and rows.max() < 100
    next_epoch = np.concatenate([sampler.rows(step) for step in range(6, 12)])
    assert not np.array_equal(rows, next_epoch)          # a new permutation each epoch


def test_order_and_draws_depend_only_on_seed_and_step():
    a, b = StepSampler(1, 50, 10), StepSampler(1, 50, 10)
    for step in (7, 0, 23, 7):                            # any visiting order, e.g. after a resume
        np.testing.assert_array_equal(a.rows(step), b.rows(step))
    np.testing.assert_array_equal(epoch_order(1, 2, 50), epoch_order(1, 2, 50))
    assert not np.array_equal(epoch_order(1, 2, 50), epoch_order(2, 2, 50))
    for got, again in zip(crop_flip_draws(5, 9, 64, 9), crop_flip_draws(5, 9, 64, 9)):
        np.testing.assert_array_equal(got, again)


def test_crop_offsets_and_flips_are_roughly_uniform():
    dy, dx, flip = crop_flip_draws(0, 1, 90000, 9)
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=9)
        assert counts.min() > 9000 and counts.max() < 11000      # 10,000 expected each; +-10% is ~30 sigma
    assert 0.48 < flip.mean() < 0.52
