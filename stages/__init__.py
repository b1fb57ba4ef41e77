"""cxr-mlops: the DVC pipeline's stages and the code they share.

Layout (each layer imports only the layers below it):
- ``stages.<stage>``: the DVC stages, run as ``python -m stages.<stage>`` (check_params, download,
  split, lungs, augment, train, evaluate; ``--task classification|detection|segmentation``);
  thin command lines over the packages.
- ``stages.classifier`` / ``stages.detector`` / ``stages.segmenter``: one package per task (params
  schema, augmentation, data, model, training core, evaluation, reports); they never import each
  other.
- ``stages.sources``: the data-source loaders of the download stage.
- ``stages.serve``: the models served (web page, ``python -m stages.predict``).
- ``stages.tools``: commands that are not stages (experiments, ablations, remote, docs, seeds,
  review).
- ``stages.common``: what every layer uses (params parsing, paths, atomic files, image decoding,
  the augment cache, downloads).

Two pieces of start-up live here because every entry point imports this package first:

1. Import order. TensorFlow loaded before torch/torchvision makes triton's bundled LLVM clash
   with TensorFlow's and the process segfaults. Where triton is importable, a meta-path hook
   imports torch the moment anything asks for ``tensorflow`` or ``keras``, so the bad order
   cannot happen. Without triton (``make setup`` removes it: it is useless on CPU) either order
   is safe, and a TensorFlow-only process skips torch's ~2 s start-up; commands that need
   neither framework (``--help``, the data stages) load neither.
2. Short command names. ``python -m stages.predict`` and the tools (``python -m
   stages.experiments`` ...) are run under their historical names; the modules live in
   ``stages.serve`` / ``stages.tools``. These names are for ``python -m`` only: import the
   modules from where they live.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys

# TensorFlow's C++ start-up chatter (oneDNN, CPU feature notices) buries the stage logs; errors
# still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# python -m stages.<name> -> the module that implements it
COMMANDS = {
    "predict": "stages.serve.predict",
    "compare": "stages.tools.compare",
    "experiments": "stages.tools.experiments",
    "ablations": "stages.tools.ablations",
    "param_table": "stages.tools.param_table",
    "remote": "stages.tools.remote",
    "registry": "stages.tools.registry",
    "docs": "stages.tools.docs",
    "repeat": "stages.tools.repeat",
    "scoreboard": "stages.tools.scoreboard",
    "weights": "stages.tools.weights",
    "shift": "stages.tools.shift",
    "review": "stages.tools.review",
    "mix": "stages.tools.mix",
}
_TF_ROOTS = ("tensorflow", "keras", "tf_keras")


@functools.cache
def _needs_torch_first() -> bool:
    """Whether TensorFlow must wait for torch: only where triton (whose LLVM is the clash) can
    be imported. Looked up without importing it."""
    return importlib.util.find_spec("triton") is not None


class _StartupFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: imports torch before TensorFlow, and maps the command aliases."""

    def find_spec(self, fullname, path=None, target=None):
        if (
            fullname.partition(".")[0] in _TF_ROOTS
            and "torch" not in sys.modules
            and _needs_torch_first()
        ):
            import torch  # noqa: F401  (the import-order guard, see the module docstring)
        if fullname.startswith("stages.") and fullname.count(".") == 1:
            real = COMMANDS.get(fullname.rpartition(".")[2])
            if real and real != fullname:
                spec = importlib.util.find_spec(real)
                if spec is not None and spec.origin and spec.submodule_search_locations is None:
                    # Same file, run under the alias name (runpy checks the loader's name).
                    return importlib.util.spec_from_file_location(fullname, spec.origin)
        return None


if not any(isinstance(f, _StartupFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StartupFinder())
