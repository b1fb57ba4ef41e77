"""RetinaNet building, backbone weights (local file, offline ImageNet), focal params, save/load."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

import stages  # noqa: F401
from stages.common.config import ConfigError, parse, to_dict
from stages.common.utils import StageError
from stages.detector.config import TrainDetectorConfig
from stages.detector.model import (
    build_detector,
    imagenet_weights_path,
    load_detector,
    predict,
    save_detector,
)

SMALL = TrainDetectorConfig(min_size=64, fpn_channels=64, threads=1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test here may reach the network: torch.hub's download entry points explode."""

    def boom(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    torch.set_num_threads(1)


def _batch(n: int = 2, size: int = 64) -> tuple[list[torch.Tensor], list[dict]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, size, size, generator=g) * 0.3 for _ in range(n)]
    targets = []
    for i, img in enumerate(images):
        x, y = 8 + 10 * i, 12
        img[0, y : y + 16, x : x + 16] = 0.9
        targets.append(
            {
                "boxes": torch.tensor([[x, y, x + 16, y + 16]], dtype=torch.float32),
                "labels": torch.tensor([1 + i % 2]),
            }
        )
    return images, targets


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_every_backbone_builds_and_predicts(backbone):
    cfg = TrainDetectorConfig(backbone=backbone, min_size=256, score_thresh=0.0)
    model = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():
        out = model([torch.rand(1, 256, 256)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) > 0
    assert int(out[0]["labels"].max()) <= 3  # K + 1 outputs, labels are category ids


def test_weights_backbone_from_local_file(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(resnet.conv1.weight, 0.123)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    cfg = dataclasses.replace(SMALL, weights_backbone=str(path), trainable_backbone_layers=2)
    model = build_detector(cfg, 2)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    # Pretrained: frozen BN statistics, and only the last 2 stages train.
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer2[0].conv1.weight.requires_grad
    assert body.layer3[0].conv1.weight.requires_grad


def test_weights_backbone_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    cfg = dataclasses.replace(SMALL, backbone="resnet50", weights_backbone=str(path))
    with pytest.raises(StageError, match="resnet50"):
        build_detector(cfg, 2)
    with pytest.raises(StageError, match="not a file"):
        build_detector(dataclasses.replace(SMALL, weights_backbone=str(tmp_path / "nope.pth")), 2)


def test_imagenet_offline_fails_fast_and_clearly(tmp_path):
    cfg = dataclasses.replace(SMALL, weights_backbone="imagenet")
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        build_detector(cfg, 2)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert str(tmp_path / "torch_home") in msg and "resnet18-f37072fd.pth" in msg
    assert "weights_backbone" in msg


def test_imagenet_weights_found_in_hub_cache(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    path = imagenet_weights_path("resnet18")
    assert path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(resnet.state_dict(), path)
    model = build_detector(dataclasses.replace(SMALL, weights_backbone="imagenet"), 2)
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)


def _cls_loss(cfg: TrainDetectorConfig) -> float:
    torch.manual_seed(0)
    model = build_detector(cfg, 2).train()
    images, targets = _batch()
    return float(model(images, targets)["classification"].detach())


def test_focal_alpha_and_gamma_reach_the_loss():
    base = _cls_loss(SMALL)
    assert _cls_loss(dataclasses.replace(SMALL, focal_alpha=0.75)) != pytest.approx(base, rel=1e-3)
    assert _cls_loss(dataclasses.replace(SMALL, focal_gamma=0.0)) != pytest.approx(base, rel=1e-3)


def test_focal_head_matches_torchvision_at_default_params():
    torch.manual_seed(0)
    model = build_detector(SMALL, 2).train()
    images, targets = _batch()
    ours = model(images, targets)["classification"].detach()
    stock = model.head.classification_head
    stock.__class__ = RetinaNetClassificationHead  # same weights, upstream loss (0.25, 2)
    stock_loss = model(images, targets)["classification"].detach()
    assert float(stock_loss) == pytest.approx(float(ours))


def test_save_load_roundtrip_gives_identical_predictions(tmp_path):
    cfg = dataclasses.replace(SMALL, score_thresh=0.0, detections_per_img=20)
    torch.manual_seed(1)
    model = build_detector(cfg, 3)
    with torch.no_grad():  # move the logits so the scores are not all the prior
        model.head.classification_head.cls_logits.bias.normal_(0, 1)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    before = predict(model, images, batch_size=2)
    path = tmp_path / "detector.pt"
    save_detector(path, model, cfg, ["A", "B", "C"], {"best_epoch": 3})
    raw = torch.load(path, weights_only=True)
    assert raw["classes"] == ["A", "B", "C"] and raw["best_epoch"] == 3
    loaded, loaded_cfg, classes = load_detector(path)
    assert not loaded.training and classes == ["A", "B", "C"] and loaded_cfg == cfg
    after = predict(loaded, list(images), batch_size=2)  # same batching: bit-identical
    assert len(after) == 3 and 0 < len(before[0]["boxes"]) <= 20  # background boxes dropped
    for b, a in zip(before, after, strict=True):
        assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int64
        for key in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["labels"].min() >= 1 and a["boxes"].max() <= 64
    other = predict(loaded, images, batch_size=3)  # other batching: float rounding only
    np.testing.assert_allclose(other[2]["scores"], before[2]["scores"], atol=1e-4)


def test_load_detector_refuses_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(StageError, match="not a detector"):
        load_detector(path)
    with pytest.raises(StageError, match="not found"):
        load_detector(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "change",
    [
        {"anchor_sizes": [[16], [32], [64], [128]]},
        {"anchor_sizes": [[16, 20], [32], [64], [128], [256]]},
        {"trainable_backbone_layers": 6},
        {"focal_alpha": 1.5},
        {"fpn_channels": 100},
        {"fpn_channels": 32},
        {"backbone": "vgg16"},
        {"unknown_key": 1},
    ],
)
def test_config_rejects_bad_values(change):
    data = {**to_dict(TrainDetectorConfig()), **change}
    with pytest.raises(ConfigError):
        parse(TrainDetectorConfig, data, "train_detector")
