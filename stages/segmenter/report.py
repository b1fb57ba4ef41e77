"""Report of the segmentation evaluation: best and worst test cases drawn, and the model card.

Inputs:  test images (uint8 (N, S, S)), ground-truth and predicted masks (bool (N, S, S)), the
         per-image figures and the evaluation document of stages.segmenter.evaluate.
Outputs (in the report dir): cases_best.png and cases_worst.png (grids of overlays; stable
         names, the image keys are in the captions) and model_card.md.
Run:     python -m stages.evaluate --task segmentation (called from stages.segmenter.evaluate).

Case ranking: best = highest Dice (ties: lower HD95, then row); worst = lowest Dice (ties: higher
HD95), never repeating a best case. Drawn: ground-truth outline green, prediction outline red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stages.common.config import to_dict

GT_COLOR, PRED_COLOR = (0, 200, 0), (230, 30, 30)
TILE_SIZE, GRID_COLS = 320, 3


def select_cases(dice: np.ndarray, hd95: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Rows of the ``k`` best and ``k`` worst cases (rules in the module docstring)."""
    rows = range(len(dice))
    best = sorted(rows, key=lambda i: (-dice[i], hd95[i], i))[:k]
    taken = set(best)
    worst = sorted((i for i in rows if i not in taken), key=lambda i: (dice[i], -hd95[i], i))[:k]
    return best, worst


def _outline(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask's edge at ``size`` px, about 2 px wide."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(
        (size, size), Image.Resampling.NEAREST
    )
    inner = im.filter(ImageFilter.MinFilter(3))
    return (np.asarray(im) > 0) & ~(np.asarray(inner) > 0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_case(
    image: np.ndarray, gt: np.ndarray, pred: np.ndarray, caption: str = "", size: int = TILE_SIZE
) -> Image.Image:
    """RGB overlay of one test image at ``size`` px: ground truth green, prediction red."""
    grey = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    rgb = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2).copy()
    rgb[_outline(gt, size)] = GT_COLOR
    rgb[_outline(pred, size)] = PRED_COLOR
    canvas = Image.fromarray(rgb)
    if caption:  # one line per "\n"-separated part, on white
        draw = ImageDraw.Draw(canvas)
        font = _font(12)
        left, top, right, bottom = draw.multiline_textbbox((0, 0), caption, font=font)
        draw.rectangle([0, 0, right - left + 6, bottom - top + 4], fill=(255, 255, 255))
        draw.multiline_text((3, 2 - top), caption, fill=(0, 0, 0), font=font)
    return canvas


def grid(tiles: Sequence[Image.Image], cols: int = GRID_COLS, tile: int = TILE_SIZE) -> Image.Image:
    """Tiles side by side, ``cols`` per row (an empty list gives one white tile)."""
    rows = max(1, -(-len(tiles) // cols))
    out = Image.new("RGB", (cols * tile, rows * tile), (255, 255, 255))
    for i, img in enumerate(tiles):
        out.paste(img.resize((tile, tile)), ((i % cols) * tile, (i // cols) * tile))
    return out


def _ci(doc: dict, key: str, digits: int = 3) -> str:
    ci = doc.get(f"{key}_ci")
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def model_card(doc: dict, meta: dict, model_config: object, train: dict | None) -> str:
    """Markdown summary: data, model, training, metrics, limits."""
    cfg = to_dict(model_config)
    sources = ", ".join(doc.get("sources", [])) or "unknown"
    lines = [
        "# Model card: lung segmenter (MONAI U-Net)",
        "",
        "Written by `python -m stages.evaluate --task segmentation`; regenerate, do not edit.",
        "",
        "## Data",
        f"- Test sources: {sources}; cache image size {meta.get('image_size')} px (resize: "
        f"{meta.get('resize')}, intensity: {meta.get('intensity', 'none')}); train/val counts "
        f"{meta.get('counts')}.",
        f"- Test split: {doc['n_test']} images with hand-drawn (or, synthetic, rendered) masks of "
        "both lungs.",
        "",
        "## Model",
        f"- MONAI {cfg.get('arch')}, channels {cfg.get('channels')}"
        + (
            f", {cfg.get('res_units')} residual units per level"
            if cfg.get("arch") == "unet"
            else ""
        )
        + f", {cfg.get('norm')} norm; per-image standardised input, one lung logit.",
        f"- Dice + BCE loss (weights {cfg.get('dice_weight')} / {cfg.get('bce_weight')}), AdamW lr "
        f"{cfg.get('lr')}, {cfg.get('lr_schedule')} schedule, batch {cfg.get('batch_size')}, "
        f"{cfg.get('epochs')} epochs, precision {cfg.get('precision')}, seed {cfg.get('seed')}; "
        "paired augmentation (policy.json of the cache).",
    ]
    if train:
        lines.append(
            f"- Best epoch {train.get('best_epoch')} of {train.get('epochs_run')} by validation "
            f"Dice {train.get('val_dice', float('nan')):.4f}; training took "
            f"{train.get('seconds', float('nan')):.0f} s."
        )
    lines += [
        "",
        "## Metrics (test split)",
        f"- Prediction: probability >= {doc['threshold']:g}, the {doc['keep_regions']} largest "
        "connected regions kept (0 = all).",
        f"- Dice {doc['dice']:.4f}{_ci(doc, 'dice', 4)}, IoU {doc['iou']:.4f}{_ci(doc, 'iou', 4)}, "
        f"HD95 {doc['hd95']:.2f}{_ci(doc, 'hd95', 2)} px ({doc['hd95_unit']}); means over images, "
        f"{100 * doc['ci']:g} % percentile bootstrap intervals ({doc['bootstrap']} resamples).",
        f"- Median Dice {doc['dice_median']:.4f}, lowest {doc['dice_min']:.4f}; images under "
        f"Dice 0.9: {doc['n_dice_below_0_9']}.",
    ]
    if doc.get("test_sets"):
        lines += ["", "| test source | images | Dice | IoU | HD95 (px) |", "|---|---|---|---|---|"]
        for name, block in doc["test_sets"].items():
            lines.append(
                f"| {name} | {block['n_test']} | {block['dice']:.4f} | {block['iou']:.4f} | "
                f"{block['hd95']:.2f} |"
            )
    lines += [
        "",
        "Best and worst test cases: cases_best.png / cases_worst.png (ground truth green, "
        "prediction red); every image's figures: per_image.csv.",
        "",
        "## Limits",
        "- Research and teaching only; not a medical device, not for diagnosis.",
        "- The masks cover the lungs as the annotators drew them (Montgomery / Shenzhen: adult "
        "tuberculosis screening); films of children, other machines and other diseases differ, "
        "so score an external test set (a `split: test` source) before relying on the masks.",
        "- HD95 is in pixels of the cache image, not millimetres: the pixel spacing of the "
        "films is unknown.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    *,
    images: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    keys: Sequence[str],
    per: dict[str, np.ndarray],
    doc: dict,
    n_cases: int,
    meta: dict,
    model_config: object,
    train: dict | None,
) -> None:
    """The case grids and the model card into ``out_dir`` (the caller makes it atomic)."""
    out_dir = Path(out_dir)
    best, worst = select_cases(per["dice"], per["hd95"], n_cases)
    for kind, rows in (("best", best), ("worst", worst)):
        tiles = []
        for i in rows:
            caption = f"{keys[i]}\nDice {per['dice'][i]:.3f}  HD95 {per['hd95'][i]:.1f} px"
            tiles.append(draw_case(images[i], gt[i], pred[i], caption))
        grid(tiles).save(out_dir / f"cases_{kind}.png")
    (out_dir / "model_card.md").write_text(model_card(doc, meta, model_config, train))


__all__ = ["draw_case", "grid", "model_card", "select_cases", "write_report"]
