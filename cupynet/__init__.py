"""cupynet: a small, readable, data-parallel ResNet training engine for CIFAR-10.

Two backends share one model definition: a NumPy reference backend (runs anywhere, checks gradients)
and a CuPy/cuDNN backend for GPUs. Start with `python -m cupynet.train --help`; saved checkpoints are evaluated
with `python -m cupynet.evaluate`.
"""

__version__ = "0.1.0"
