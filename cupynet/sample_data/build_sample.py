"""Cut the built-in CIFAR-10 sample from a full cifar-10-batches-py folder.

    python -m cupynet.sample_data.build_sample SRC_BATCHES_DIR [--seed 0] [--out DIR]

SRC_BATCHES_DIR is a full CIFAR-10 folder (or its parent), e.g. the one that
`python3 ../shared/data/cifar10_from_jpeg.py /tmp/cifar_full` writes to /tmp/cifar_full/cifar-10-batches-py.
The sample keeps the official layout, written by `cupynet.data.write_batch_file`:
  data_batch_1..5  200 images each: 20 per class, drawn from the same-numbered full batch
  test_batch       500 images: 50 per class, drawn from the full test batch
  batches.meta     the label names of the source
Picks are seeded, so the same source and seed rebuild the same bytes. Within each file the picked images are
shuffled, as in the official batches, so any tail of the training data (the validation split) mixes classes.
--out defaults to the sample inside the package (cupynet/sample_data/cifar-10-batches-py).
"""

import argparse
import os
import sys

import numpy as np

from cupynet import data
from cupynet.errors import DataError

TRAIN_PER_CLASS = 20  # per training batch: 5 x 10 x 20 = 1,000 training images
TEST_PER_CLASS = 50  # 10 x 50 = 500 test images


def pick_balanced(labels, per_class, rng, source) -> np.ndarray:
    """Indices of `per_class` random images of each class, in a random order.

    labels: int32 (N,) in 0..9 -> int (10 * per_class,)
    """
    picks = []
    for cls in range(data.NUM_CLASSES):
        candidates = np.flatnonzero(labels == cls)
        if candidates.size < per_class:
            raise DataError(f"{source}: class {cls} has only {candidates.size} images, the sample needs {per_class}")
        picks.append(rng.choice(candidates, size=per_class, replace=False))
    return rng.permutation(np.concatenate(picks))


def cut_batch(src_dir, out_dir, name, batch_label, per_class, rng) -> None:
    """Write out_dir/name holding a class-balanced pick from src_dir/name."""
    src_path = os.path.join(src_dir, name)
    images, labels = data.read_batch_file(src_path)  # (N, 32, 32, 3), (N,)
    index = pick_balanced(labels, per_class, rng, src_path)
    # Filenames record where each image came from: source batch and row in it.
    filenames = [f"{name}_{i:05d}" for i in index]
    data.write_batch_file(os.path.join(out_dir, name), images[index], labels[index], batch_label, filenames)


def build(src, out_dir, seed=0) -> None:
    """Write the sample cut from the full batches under `src` into `out_dir`."""
    src_dir = data.find_batches_dir(src)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    label_names = data.read_meta_file(os.path.join(src_dir, data.META_NAME))
    data.write_meta_file(
        os.path.join(out_dir, data.META_NAME), label_names, num_cases_per_batch=TRAIN_PER_CLASS * data.NUM_CLASSES
    )
    for i, name in enumerate(data.TRAIN_BATCH_NAMES, start=1):
        label = f"sample of training batch {i} of 5 (seed {seed})"
        cut_batch(src_dir, out_dir, name, label, TRAIN_PER_CLASS, rng)
    cut_batch(src_dir, out_dir, data.TEST_BATCH_NAME, f"sample of testing batch 1 of 1 (seed {seed})",
              TEST_PER_CLASS, rng)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC_BATCHES_DIR", help="full cifar-10-batches-py folder (or its parent)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the picks (default 0)")
    parser.add_argument("--out", default=data.builtin_sample_dir(), help="where to write the sample")
    args = parser.parse_args(argv)
    try:
        build(args.src, args.out, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"{args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
