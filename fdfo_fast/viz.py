"""Image grids as PNG: nearest-neighbour upscaled tiles, optional coloured borders (green = correct); for a video
model the same grids and pages animated, as GIF (`AnimatedPage`: one page per preview frame)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdfo_fast.rewards.base import to_uint8_hwc

GOOD, BAD = (40, 200, 60), (220, 40, 40)


def image_grid(
    images: torch.Tensor, ncol: int, scale: int = 4, borders: list[tuple[int, int, int]] | None = None, pad: int = 2
) -> Image.Image:
    """[N, 3, H, W] in [-1, 1] (or uint8) -> one PIL image, tiles row-major, each framed by `borders[i]`."""
    tiles = to_uint8_hwc(images)  # [N, H, W, 3]
    n, h, w, _ = tiles.shape
    nrow = (n + ncol - 1) // ncol
    th, tw = h * scale + 2 * pad, w * scale + 2 * pad
    canvas = np.full((nrow * th, ncol * tw, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = r * th, c * tw
        if borders is not None:
            canvas[y : y + th, x : x + tw] = borders[i]
        canvas[y + pad : y + pad + h * scale, x + pad : x + pad + w * scale] = tile.repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, ncol: int, correct: torch.Tensor | None = None, scale: int = 4):
    """The grid as PNG at `path`; videos [N, 3, F, H, W] as an animated grid, the GIF beside it (`save_page`)."""
    borders = None if correct is None else [GOOD if bool(c) else BAD for c in correct]
    if images.ndim == 5:
        return save_page(AnimatedPage([image_grid(f, ncol, scale, borders) for f in preview_frames(images)]), path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncol, scale, borders).save(path)
    return path


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """One [3, H, W] image in [-1, 1] as a lossless PNG at its own resolution (`save_png`); a video [3, F, H, W] as
    a GIF of all its frames beside it (path with .gif)."""
    if image.ndim == 4:
        frames = [Image.fromarray(t) for t in to_uint8_hwc(image.transpose(0, 1))]
        return save_page(AnimatedPage(frames), path)
    return save_png(Image.fromarray(to_uint8_hwc(image[None])[0]), path)


# -- videos -----------------------------------------------------------------------------------------------------
PREVIEW_FRAMES = 16  # a preview page or grid animates at most this many frames, evenly spaced (bounded files)
PREVIEW_FPS = 16  # Wan2.1's frame rate (its pipeline exports at 16 fps)


def preview_frames(videos: torch.Tensor, most: int = PREVIEW_FRAMES) -> list[torch.Tensor]:
    """[N, 3, F, H, W] -> at most `most` evenly spaced frames, each [N, 3, H, W] (first and last included)."""
    f = videos.shape[2]
    picks = sorted({round(j * (f - 1) / (most - 1)) for j in range(most)}) if f > most else range(f)
    return [videos[:, :, t] for t in picks]


class AnimatedPage:
    """A page of a video model's outputs: one PIL page per preview frame, saved as a looping GIF; `still` (the
    middle frame) is what an image tracker shows."""

    def __init__(self, frames: list[Image.Image], fps: int = PREVIEW_FPS):
        self.frames, self.fps = frames, fps

    @property
    def still(self) -> Image.Image:
        return self.frames[len(self.frames) // 2]


def still(page) -> Image.Image:
    """A page as one PIL image (an animated page's middle frame)."""
    return page.still if isinstance(page, AnimatedPage) else page


def save_page(page, path: str | Path) -> Path:
    """A page from `captioned_pages` / a grid: PNG at `path`, an `AnimatedPage` as GIF (suffix .gif), each written
    to a temp file beside it and moved into place; returns the path written."""
    if not isinstance(page, AnimatedPage):
        return save_png(page, path)
    path = Path(path).with_suffix(".gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    first, *rest = page.frames
    first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=round(1000 / page.fps), loop=0)
    tmp.replace(path)
    return path


# -- captioned, bounded pages (held-out grids and rollout panels for files and trackers) ----------------------------
SMALL_IMAGE_PX = 64  # toy-sized images are enlarged (nearest) to MIN_CELL_PX; larger ones only ever shrink
MIN_CELL_PX = 128
MAX_CELL_PX = 256  # a 1024² SD3.5 image is shown at 256 px: a page of 8 × 4 cells stays near 2k × 1.3k px


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow: a scalable font
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` broken at spaces into lines at most `width` px wide; at most `max_lines`, the last ending in '…'."""
    lines: list[str] = []
    for para in text.split("\n"):
        # a list of terms ("reward 0.81 · alignment 1.00") breaks between terms, plain text between words
        sep = " · " if " · " in para else " "
        line = ""
        for token in para.split(sep):
            trial = f"{line}{sep}{token}" if line else token
            if draw.textlength(trial, font=font) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = token
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip() + " ..."
    for i, ln in enumerate(lines):  # a single token wider than the cell
        while draw.textlength(ln, font=font) > width and len(ln) > 3:
            ln = ln[:-4] + "..."
        lines[i] = ln
    return lines


def cell_images(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL cells: small (toy) images enlarged with nearest neighbour to ≥ MIN_CELL_PX,
    large ones shrunk (Lanczos) to ≤ MAX_CELL_PX on their longer side; aspect ratio kept."""
    tiles = to_uint8_hwc(images)
    h, w = tiles.shape[1:3]
    cells = []
    for tile in tiles:
        img = Image.fromarray(tile)
        if max(h, w) <= SMALL_IMAGE_PX:
            k = max(1, MIN_CELL_PX // max(h, w))
            img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
        elif max(h, w) > MAX_CELL_PX:
            f = MAX_CELL_PX / max(h, w)
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
        cells.append(img)
    return cells


def captioned_pages(
    images: torch.Tensor,
    captions: list[str],
    ncol: int,
    rows_per_page: int = 6,
    row_titles: list[str] | None = None,
    borders: list[tuple[int, int, int]] | None = None,
    caption_lines: int = 4,
) -> list[Image.Image]:
    """Cells with their captions under them, `ncol` per row, `rows_per_page` rows per page (so a page is bounded
    whatever the number and size of the images); `row_titles[r]` is drawn across row r (e.g. a rollout's prompt),
    `borders[i]` frames cell i (green = correct). Videos [N, 3, F, H, W] give `AnimatedPage`s (`save_page`)."""
    from PIL import ImageDraw

    if images.ndim == 5:
        kw = dict(ncol=ncol, rows_per_page=rows_per_page, row_titles=row_titles, borders=borders,
                  caption_lines=caption_lines)  # fmt: skip
        per_frame = [captioned_pages(f, captions, **kw) for f in preview_frames(images)]
        return [AnimatedPage([pages[k] for pages in per_frame]) for k in range(len(per_frame[0]))]
    cells = cell_images(images)
    if len(captions) != len(cells):
        raise ValueError(f"captioned_pages: {len(cells)} images, {len(captions)} captions")
    cw = max(c.width for c in cells)
    ch = max(c.height for c in cells)
    pad, fs = 4, 12 if cw >= 192 else 11
    font = _font(fs)
    line_h = fs + 3
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(scratch, c, font, cw, caption_lines) for c in captions]
    cap_h = line_h * max((len(w) for w in wrapped), default=0) + pad
    nrow = (len(cells) + ncol - 1) // ncol
    title_h = line_h * 2 + pad if row_titles else 0
    tw, th = cw + 2 * pad, ch + cap_h + 2 * pad
    pages = []
    for first_row in range(0, nrow, rows_per_page):
        rows = range(first_row, min(nrow, first_row + rows_per_page))
        page = Image.new("RGB", (ncol * tw, len(rows) * (th + title_h)), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        for r_i, r in enumerate(rows):
            y0 = r_i * (th + title_h)
            if row_titles:
                for j, ln in enumerate(_wrap(draw, row_titles[r], font, ncol * tw - 2 * pad, 2)):
                    draw.text((pad, y0 + pad // 2 + j * line_h), ln, fill=(0, 0, 0), font=font)
            for c in range(ncol):
                i = r * ncol + c
                if i >= len(cells):
                    break
                x, y = c * tw, y0 + title_h
                if borders is not None:
                    draw.rectangle([x, y, x + tw - 1, y + ch + 2 * pad - 1], fill=borders[i])
                page.paste(cells[i], (x + pad + (cw - cells[i].width) // 2, y + pad))
                for j, ln in enumerate(wrapped[i]):
                    draw.text((x + pad, y + ch + 2 * pad + j * line_h), ln, fill=(30, 30, 30), font=font)
        pages.append(page)
    return pages


def save_png(image: Image.Image, path: str | Path) -> Path:
    """A PIL image as PNG, written to a temp file beside it and moved into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def fit_images(images: torch.Tensor, max_px: int) -> torch.Tensor:
    """[N, 3, H, W] (or videos [N, 3, F, H, W], frame by frame) shrunk (area average) so the longer side is at most
    `max_px`; smaller images unchanged."""
    h, w = images.shape[-2:]
    if max(h, w) <= max_px:
        return images
    f = max_px / max(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    if images.ndim == 5:  # area pooling of each frame (no mixing along time)
        return torch.nn.functional.interpolate(images.float(), size=(images.shape[2], *size), mode="area")
    return torch.nn.functional.interpolate(images.float(), size=size, mode="area")
