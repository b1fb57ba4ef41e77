"""Pipeline stages: each runs as ``python -m stages.<name>`` and reads its own params section.

Importing torch before anything else is deliberate: TensorFlow loaded before torchvision makes
triton's bundled LLVM clash with TensorFlow's and the process segfaults. Every entry point of the
project (stages, tests, benchmarks) imports this package first, so the order is fixed here once.
The set-up (`make setup`) also removes triton, which the CPU build never needs.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU feature notices) buries the stage logs; errors
# still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402, F401  (import order guard, see above)
