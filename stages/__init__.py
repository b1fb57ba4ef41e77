"""Pipeline stages: each runs as ``python -m stages.<name>`` and reads its own params section.

Importing torch before anything else is deliberate: TensorFlow loaded before torchvision makes
triton's bundled LLVM clash with TensorFlow's and the process segfaults. Every entry point of the
project (stages, tests, benchmarks) imports this package first, so the order is fixed here once.
The set-up (`make setup`) also removes triton, which the CPU build never needs.
"""

import torch  # noqa: F401  (import order guard, see above)
