"""A small real CIFAR-10 sample shipped with cupynet (cifar-10-batches-py/), so the loader, the tests and
a first training run work without downloading anything. See README.md here; `build_sample.py` rebuilds it.
"""
