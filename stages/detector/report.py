"""Box report of the detection evaluation: best/worst test cases drawn, and the model card.

Inputs:  test images (uint8 (N, S, S)), predictions and ground truth per image, the metrics dict
         of stages.detector.evaluate.
Outputs (in the report dir): cases_best.png, cases_worst.png (grids; dvc.yaml image plots),
         cases/{best,worst}_<rank>.png (each case at full size), cases/cases.csv (which test image
         each one is, with its scores) and model_card.md. The FROC and AP-per-class curves are
         Vega plots of plots/froc.csv and plots/ap_per_class.csv (written by the caller), not
         pictures here.
Run:     python -m stages.evaluate --task detection (called from stages.detector.evaluate).

Case ranking: per-image F1 of the boxes with score >= ``score_thresh``, matched to ground truth
as in the FROC (same class, IoU >= ``iou``, greedy by score, each GT box hit once):
F1 = 2TP / (2TP + FP + FN); an image with no GT and no shown box scores 1. Best = highest F1
(ties: more GT boxes first, so clean hits on findings beat empty normals); worst = lowest F1
(ties: more errors first), never repeating a best case. Drawn: GT green, TP orange, FP red.
Case files are named by rank only (best_01.png ...): a new run rewrites the same files instead
of deleting and adding tracked files named by image id; the image id is in each picture's
caption and in cases.csv.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.common.config import to_dict
from stages.detector.froc import match_image

GT_COLOR, TP_COLOR, FP_COLOR = (0, 200, 0), (255, 165, 0), (230, 30, 30)
CASE_SIZE, TILE_SIZE, GRID_COLS = 512, 320, 3
# Seed 004 (SEEDS.md): RetinaNet ResNet-101, ChestX-Det10 1024 px, per-class AP after 10 epochs.
_SEED_NAMES = (
    "Consolidation Fibrosis Effusion Nodule Mass Emphysema Calcification Atelectasis Fracture"
)
_SEED_VALUES = (0.484, 0.074, 0.293, 0.236, 0.142, 0.277, 0.096, 0.209, 0.279)
SEED004_AP = dict(zip(_SEED_NAMES.split(), _SEED_VALUES, strict=True))


def image_scores(
    preds: Sequence[dict], gts: Sequence[tuple], score_thresh: float, iou: float
) -> list[dict]:
    """Per image: tp, fp, fn, n_gt and f1 of the boxes shown (score >= score_thresh)."""
    out = []
    for i, (pred, (gt_boxes, gt_labels)) in enumerate(zip(preds, gts, strict=True)):
        keep = np.asarray(pred["scores"]) >= score_thresh
        shown = (pred[k][keep] for k in ("boxes", "scores", "labels"))
        flags = match_image(*shown, gt_boxes, gt_labels, iou)
        tp, fp, n_gt = int(flags.sum()), int((~flags).sum()), len(gt_labels)
        fn = n_gt - tp
        f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        out.append({"id": i, "tp": tp, "fp": fp, "fn": fn, "n_gt": n_gt, "f1": f1})
    return out


def select_cases(scores: Sequence[dict], k: int) -> tuple[list[int], list[int]]:
    """Image ids of the ``k`` best and ``k`` worst cases (rules in the module docstring)."""
    best = sorted(scores, key=lambda s: (-s["f1"], -s["n_gt"], s["id"]))[:k]
    taken = {s["id"] for s in best}
    rest = [s for s in scores if s["id"] not in taken]
    worst = sorted(rest, key=lambda s: (s["f1"], -(s["fp"] + s["fn"]), s["id"]))[:k]
    return [s["id"] for s in best], [s["id"] for s in worst]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple) -> None:
    font = _font(13)
    x, y = xy
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    h = bottom - top + 2
    y = y - h if y - h >= 0 else y  # above the box when there is room, else inside
    draw.rectangle([x, y, x + right - left + 4, y + h], fill=color)
    draw.text((x + 2, y - top + 1), text, fill=(0, 0, 0), font=font)


def draw_case(
    image: np.ndarray,
    gt: tuple[np.ndarray, np.ndarray],
    pred: dict,
    names: dict[int, str],
    score_thresh: float,
    iou: float,
    caption: str = "",
    size: int = CASE_SIZE,
) -> Image.Image:
    """RGB picture of one test image at ``size`` px: GT green, predictions orange (TP) / red (FP)."""
    scale = size / image.shape[1]
    canvas = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
        (size, round(image.shape[0] * scale)), Image.Resampling.BILINEAR
    )
    canvas = canvas.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    gt_boxes, gt_labels = gt
    for box, lab in zip(gt_boxes, gt_labels, strict=True):
        draw.rectangle(list(np.asarray(box) * scale), outline=GT_COLOR, width=2)
        _label(draw, (box[0] * scale, box[3] * scale + 16), names.get(int(lab), str(lab)), GT_COLOR)
    keep = np.asarray(pred["scores"]) >= score_thresh
    boxes, scores, labels = pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep]
    flags = match_image(boxes, scores, labels, gt_boxes, gt_labels, iou)
    for box, score, lab, hit in zip(boxes, scores, labels, flags, strict=True):
        color = TP_COLOR if hit else FP_COLOR
        draw.rectangle(list(np.asarray(box) * scale), outline=color, width=2)
        _label(
            draw, (box[0] * scale, box[1] * scale), f"{names.get(int(lab), lab)} {score:.2f}", color
        )
    if caption:
        _label(draw, (0, 0), caption, (255, 255, 255))
    return canvas


def grid(tiles: Sequence[Image.Image], cols: int = GRID_COLS, tile: int = TILE_SIZE) -> Image.Image:
    """Tiles side by side, ``cols`` per row, each resized to ``tile`` px."""
    rows = max(1, -(-len(tiles) // cols))
    out = Image.new("RGB", (cols * tile, rows * tile), (255, 255, 255))
    for i, img in enumerate(tiles):
        out.paste(
            img.resize((tile, tile), Image.Resampling.LANCZOS),
            ((i % cols) * tile, (i // cols) * tile),
        )
    return out


def _seed_ap(name: str) -> float | None:
    return {k.lower(): v for k, v in SEED004_AP.items()}.get(name.lower())


def seed_matched(names: Sequence[str], sources: Sequence[str]) -> list[str]:
    """Our classes that seed 004 also scored, when the data are real (synthetic: none)."""
    if not sources or any("synthetic" in s for s in sources):
        return []
    return [n for n in names if _seed_ap(n) is not None]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def model_card(metrics: dict, meta: dict, model_config: object, sources: Sequence[str]) -> str:
    """Markdown summary: data, model, metrics, seed 004 comparison, limits."""
    cfg = to_dict(model_config)
    rates = list(metrics["froc_recall_at"])
    per_class = metrics["froc_per_class"]
    lines = [
        "# Model card: thoracic finding detector (RetinaNet)",
        "",
        "Written by `python -m stages.evaluate --task detection`; regenerate, do not edit. "
        "Figures in this folder: cases_best.png and cases_worst.png (the test images with the "
        "highest and lowest F1 of the boxes shown; each at full size in cases/, which "
        "cases/cases.csv names). The FROC and AP-per-class curves: `dvc plots show` "
        "(plots/froc.csv, plots/ap_per_class.csv).",
        "",
        "## Data",
        f"- Sources: {', '.join(sources) or 'unknown'}; cache image size {meta.get('image_size')} px "
        f"(resize: {meta.get('resize')}); split counts {meta.get('counts')}.",
        f"- Test split: {metrics['n_test_images']} images, {metrics['n_gt_boxes']} boxes; "
        f"classes: {', '.join(per_class)}.",
        "",
        "## Model",
        f"- RetinaNet, {cfg.get('backbone')} FPN, weights_backbone {cfg.get('weights_backbone')}, "
        f"{cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, input {cfg.get('min_size')} px; "
        f"focal alpha {cfg.get('focal_alpha')}, gamma {cfg.get('focal_gamma')}; score threshold "
        f"{cfg.get('score_thresh')}, NMS {cfg.get('nms_thresh')}, "
        f"{cfg.get('detections_per_img')} detections per image.",
        "",
        "## Metrics (test split)",
        f"- COCO mAP@[.5:.95] {metrics['map']:.3f}, mAP@0.5 {metrics['map_50']:.3f}; "
        f"mean per-class AP@0.5 {_fmt(metrics['mean_ap_50_over_classes'])}.",
        f"- FROC (ChestX-Det10 metric, IoU >= {metrics['iou']:g}): sensitivity "
        + ", ".join(f"{_fmt(metrics['froc_recall_at'][r])} at {r}" for r in rates)
        + f" FP/image; average {_fmt(metrics['froc_avg_recall'])}.",
        "",
    ]
    # Seed 004's numbers sit beside ours only for real ChestX-Det10-named classes.
    matched = seed_matched(list(per_class), sources)
    extra = " seed 004 AP (epoch 10) |" if matched else ""
    lines += [
        "| class | GT boxes | AP@0.5 | FROC avg recall |" + extra,
        "|---|---|---|---|" + ("---|" if matched else ""),
    ]
    for name, stats in per_class.items():
        seed = f" {_fmt(_seed_ap(name))} |" if matched else ""
        lines.append(
            f"| {name} | {stats['n_gt']} | {_fmt(metrics['ap_50_per_class'][name])} | "
            f"{_fmt(stats['avg_recall'])} |" + seed
        )
    lines += ["", "## Comparison with seed 004", ""]
    if matched:
        ours = [
            metrics["ap_50_per_class"][n]
            for n in matched
            if metrics["ap_50_per_class"][n] is not None
        ]
        theirs = [_seed_ap(n) for n in matched if metrics["ap_50_per_class"][n] is not None]
        lines.append(
            f"Classes shared with seed 004: {len(matched)}. Mean AP over those with test boxes: "
            f"ours {_fmt(float(np.mean(ours)) if ours else None)}, seed 004 "
            f"{_fmt(float(np.mean(theirs)) if theirs else None)} (their bar: mean per-class AP 0.23 "
            "after 10 epochs, ResNet-101, 1024 px; their AP definition is not stated, read as AP@0.5)."
        )
    else:
        lines.append(
            "The data are synthetic lesions or classes other than ChestX-Det10's findings: no "
            "per-class comparison with seed 004 is meaningful. Their bar on ChestX-Det10 is a mean "
            "per-class AP of 0.23 after 10 epochs (ResNet-101, 1024 px)."
        )
    lines += [
        "",
        "## Limits",
        "- Research and teaching only; not a medical device, not for diagnosis.",
        "- Small test sets give wide uncertainty on every number here; AP of classes with few boxes "
        "is especially unstable. Synthetic-lesion results say the pipeline learns, nothing clinical.",
        "- COCO mAP counts at most 100 detections per image; FROC counts all of them.",
        "",
    ]
    return "\n".join(lines)


CASES_NAME = "cases"  # the folder of the full-size cases inside the report dir
CASES_COLUMNS = ("file", "kind", "rank", "image_id", "image", "f1", "tp", "fp", "fn", "n_gt")


def case_file(kind: str, rank: int) -> str:
    """Stable name of a case picture: the same files every run, whatever images they show."""
    return f"{kind}_{rank:02d}.png"


def write_report(
    out_dir: Path,
    *,
    images: np.ndarray,
    preds: Sequence[dict],
    gts: Sequence[tuple],
    names: dict[int, str],
    metrics: dict,
    score_thresh: float,
    iou: float,
    n_cases: int,
    meta: dict,
    model_config: object,
    sources: Sequence[str] = (),
    image_names: Sequence[str] = (),
) -> None:
    """Everything of the report into ``out_dir`` (the caller makes it atomic). ``image_names``
    (one per test image, e.g. its path in the split index) go into cases.csv."""
    out_dir = Path(out_dir)
    cases_dir = out_dir / CASES_NAME
    cases_dir.mkdir(parents=True, exist_ok=True)
    scores = image_scores(preds, gts, score_thresh, iou)
    best, worst = select_cases(scores, n_cases)
    rows = []
    for kind, ids in (("best", best), ("worst", worst)):
        tiles = []
        for rank, i in enumerate(ids, start=1):
            s = scores[i]
            caption = f"id {i}  F1 {s['f1']:.2f}  TP {s['tp']} FP {s['fp']} FN {s['fn']}"
            img = draw_case(images[i], gts[i], preds[i], names, score_thresh, iou, caption)
            img.save(cases_dir / case_file(kind, rank))
            tiles.append(img)
            image = str(image_names[i]) if len(image_names) else ""
            rows.append([case_file(kind, rank), kind, rank, i, image, f"{s['f1']:.4f}"] +
                        [s[k] for k in ("tp", "fp", "fn", "n_gt")])  # fmt: skip
        grid(tiles).save(out_dir / f"cases_{kind}.png")
    with (cases_dir / "cases.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CASES_COLUMNS)
        writer.writerows(rows)
    (out_dir / "model_card.md").write_text(model_card(metrics, meta, model_config, sources))


__all__ = [
    "SEED004_AP",
    "case_file",
    "draw_case",
    "grid",
    "image_scores",
    "model_card",
    "seed_matched",
    "select_cases",
    "write_report",
]
