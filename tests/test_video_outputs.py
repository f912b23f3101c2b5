"""Video models' outputs: rewards on frames (image terms averaged per video), the temporal-consistency term, the
animated previews (GIF) and the config's refusals. The video model itself (Wan2.1) is tested in tests/test_wan.py."""

import pytest
import torch
from PIL import Image

from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.base import SCORED_ROWS
from fdfo_fast.rewards.video import temporal_consistency, video_frames
from fdfo_fast.viz import PREVIEW_FRAMES, AnimatedPage, captioned_pages, image_grid, save_grid, save_image, save_page

U32 = 2.0**-23  # fp32's unit in the last place of 1


def _videos(b=2, f=5, h=16, w=16, seed=0):
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_image_terms_score_each_frame_and_average_per_video():
    """A video's term = the mean of the same term on each of its frames scored as an image on its own (the image
    path, one frame per call); the prompt reaches every frame."""
    videos = _videos()
    reward = CompositeReward("quality:1,jpeg_incompressibility:0.05")
    ours = reward(videos, ["a", "b"])
    for b in range(2):
        frames = [reward(videos[b : b + 1, :, t], ["ab"[b]]) for t in range(videos.shape[2])]
        for name in ("quality", "jpeg_incompressibility"):  # the same per-frame numbers, averaged in the same order
            assert torch.equal(ours[name][b], torch.stack([fr[name][0] for fr in frames]).mean()), name
    assert torch.equal(ours["reward"], ours["quality"] + 0.05 * ours["jpeg_incompressibility"])  # weighed once
    assert video_frames(videos)[7].equal(videos[1, :, 2])  # row b·F + t is frame t of video b


def test_frame_scoring_reports_videos_to_the_progress_bar():
    seen = []
    token = SCORED_ROWS.set(seen.append)
    try:
        CompositeReward("quality:1,temporal_consistency:0.5")(_videos(b=3), ["a", "b", "c"])
    finally:
        SCORED_ROWS.reset(token)
    assert sum(seen) == 3  # samples, not the 15 frames


def test_temporal_consistency_is_one_for_still_and_steady_clips_and_falls_with_flicker():
    h = w = 16
    still = torch.full((1, 3, 5, h, w), 0.3)
    fade = torch.linspace(-1, 1, 9).view(1, 1, 9, 1, 1).expand(1, 3, 9, h, w)  # intensity changing at constant speed
    flicker = torch.tensor([-1.0, 1.0] * 4 + [-1.0]).view(1, 1, 9, 1, 1).expand(1, 3, 9, h, w)  # 0,1,0,1,… in [0, 1]
    assert temporal_consistency(still).item() == 1.0
    # the fade's frames are fp32 roundings of a linspace (≤ 1 unit u of 1 each, after (x + 1)/2 one more): a second
    # difference of three is off by ≤ 8u, its mean too, the score by ≤ 4u (+ its own rounding)
    assert abs(temporal_consistency(fade).item() - 1.0) <= 5 * U32
    assert temporal_consistency(flicker).item() == 0.0  # |1 − 0 + 1| = 2 everywhere: the formula's minimum
    assert temporal_consistency(still[:, :, :2]).item() == 1.0  # < 3 frames: no second difference
    # one frame popping to white in the middle of a still clip: 3 second differences of 1, 2, 1 (in [0, 1] units)
    pop = still.clone()
    pop[:, :, 2] = 1.0
    u = (0.3 + 1) / 2
    expected = 1 - (1 - u) * (1 + 2 + 1) / 3 / 2
    assert abs(temporal_consistency(pop).item() - expected) <= 5 * U32  # the same rounding bound


def test_video_pages_and_grids_are_gifs_of_the_preview_frames(tmp_path):
    videos = _videos(b=3, f=2 * PREVIEW_FRAMES + 1)
    path = save_grid(videos, tmp_path / "grid.png", ncol=3)
    assert path.suffix == ".gif"
    with Image.open(path) as gif:
        assert gif.n_frames == PREVIEW_FRAMES and gif.info["loop"] == 0
        assert gif.size == image_grid(videos[:, :, 0], 3).size
    pages = captioned_pages(videos, ["x", "y", "z"], ncol=3)
    assert len(pages) == 1 and isinstance(pages[0], AnimatedPage) and len(pages[0].frames) == PREVIEW_FRAMES
    first = captioned_pages(videos[:, :, 0], ["x", "y", "z"], ncol=3)[0]
    assert pages[0].frames[0].tobytes() == first.tobytes()  # frame 0 and the last frame are always shown
    assert pages[0].frames[-1].tobytes() == captioned_pages(videos[:, :, -1], ["x", "y", "z"], ncol=3)[0].tobytes()
    assert save_page(pages[0], tmp_path / "page.png").name == "page.gif"
    one = save_image(videos[0], tmp_path / "000.png")  # fdfo-generate: every frame of the sample
    with Image.open(one) as gif:
        assert one.name == "000.gif" and gif.n_frames == videos.shape[2] and gif.size == (16, 16)


def test_the_config_refuses_video_terms_for_image_models_and_human_for_video_models(tmp_path):
    def check(message, **kw):
        with pytest.raises(FdfoError, match=message):
            make_config(overrides=dict(out=str(tmp_path / "r"), **kw)).validate()

    check("scores videos", reward="quality:1,temporal_consistency:1")
    check("applies to video models", num_frames=5)
    check("toy model's images are square", width=32)
    wan = dict(model="wan", model_path=str(tmp_path), prompts="geneval-coco:train", eval_prompts="geneval-coco:test",
               reward="quality:1")  # fmt: skip
    check("must be 4k [+] 1 for --model wan", num_frames=6, **wan)  # before any weights load
    check("uses 'human': the labelling page shows images", **{**wan, "reward": "human:1"})
    make_config(overrides=dict(out=str(tmp_path / "r"), num_frames=33, **wan)).validate()


def test_fdfo_eval_refuses_a_video_model_in_one_line(tmp_path, capsys):
    from fdfo_fast.compare import main

    with pytest.raises(SystemExit) as exc:
        main(["--lora", str(tmp_path), "--model", "wan", "--model-path", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fdfo-eval compares image models" in err and "Traceback" not in err, err
