"""An example reward plugin: `colour_coverage`, a structured reward that reads each prompt's metadata.

    fdfo-train --reward-plugin examples/reward_plugin.py:make_colour_coverage \
               --reward alignment:1,colour_coverage:0.5

(or `--reward-plugin examples.reward_plugin:make_colour_coverage` with the checkout on PYTHONPATH, or as an installed
package's entry point in the group "fdfo_fast.rewards"; fdfo_fast/rewards/plugins.py says how plugins load.)

`colour_coverage` ∈ [0, 1] is the fraction of an image's foreground pixels (those not the background colour) that
are close to a colour the prompt asks for. The requested colours come from the prompt's metadata in GenEval's form,
`{"tag": ..., "include": [{"class": ..., "count": ..., "color": ...}, ...]}`: the shapes world's prompts get it from
the grammar, and a JSONL prompt file (`--prompts prompts.jsonl`, one `{"prompt": ..., <any fields>}` per line) gives
its own fields. A prompt that names no colour scores 1 for every image (nothing to check), an empty image 0.

What a plugin must do (checked by the trainer, one `error:` line otherwise): be a factory returning a
`fdfo_fast.rewards.Reward` (or a list of them) whose `names` are its term names, and return for a batch of B images
a dict with exactly those names, each a float tensor of shape [B] with finite values. It may declare what else it
reads: `wants_uint8` (the uint8 [B, H, W, 3] images, from the composite's one preprocessing pass), `wants_metadata`
(the prompts' metadata), `wants_seeds` (the samples' seeds). A factory that takes `device` / `dtype` parameters gets
the run's reward device and `--reward-dtype`; options after `;` in `--reward-plugin` arrive as keywords.
"""

from __future__ import annotations

import torch

from fdfo_fast.rewards import Reward
from fdfo_fast.world.render import BACKGROUND, PALETTE

# The shapes world's colours in 0–255 RGB; a plugin for another world would hold its own table.
COLOURS = {name: tuple(255 * c for c in rgb) for name, rgb in PALETTE.items()}
BACKGROUND_RGB = tuple(255 * c for c in BACKGROUND)


class ColourCoverage(Reward):
    names = ("colour_coverage",)
    wants_uint8 = True
    wants_metadata = True

    def __init__(self, tolerance: float = 60.0):
        self.tolerance = float(tolerance)  # RGB distance (0–255 units) within which a pixel counts as the colour

    def __call__(self, images, prompts, uint8_nhwc=None, metadata=None):
        self.check_batch(images, prompts)
        rgb = uint8_nhwc.float()  # [B, H, W, 3]
        foreground = (rgb - torch.tensor(BACKGROUND_RGB, dtype=torch.float32)).norm(dim=-1) > self.tolerance
        scores = []
        for j, fields in enumerate(metadata):
            wanted = [o["color"] for o in fields.get("include", ()) if o.get("color") in COLOURS]
            if not wanted:
                scores.append(1.0)
                continue
            table = torch.tensor([COLOURS[c] for c in wanted], dtype=torch.float32)  # [K, 3]
            near = (rgb[j, ..., None, :] - table).norm(dim=-1).min(-1).values <= self.tolerance  # [H, W]
            fg = foreground[j]
            scores.append(float((near & fg).sum()) / max(1, int(fg.sum())))
        return {"colour_coverage": torch.tensor(scores, dtype=torch.float32)}


def make_colour_coverage(tolerance: float = 60.0) -> ColourCoverage:
    """The factory `--reward-plugin examples/reward_plugin.py:make_colour_coverage[;tolerance=40]` names."""
    return ColourCoverage(tolerance)
