"""Checkpoint files: atomic writes, and loads that fail with one clear line on a missing, corrupt or mismatched file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from fdfo_fast.errors import FdfoError

TOY_FORMAT = "fdfo_fast.toy_flow"
# The shipped toy base model (see README: how it was produced).
TOY_BASE_CHECKPOINT = Path(__file__).parent / "assets" / "toy_base.pt"


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | Path, expected_format: str | None = None) -> dict:
    """torch.load a checkpoint dict (weights_only) or raise FdfoError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FdfoError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise FdfoError(f"checkpoint {path} is a directory, expected a .pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise FdfoError(f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise FdfoError(f"checkpoint {path} is not an fdfo_fast checkpoint (no 'format' field)")
    if expected_format is not None and obj["format"] != expected_format:
        raise FdfoError(f"checkpoint {path} holds {obj['format']!r}, expected {expected_format!r}")
    return obj


def load_state_dict_strict(module: torch.nn.Module, state: dict, where: str) -> None:
    """load_state_dict that reports missing / unexpected / mis-shaped keys in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise FdfoError(f"{where} does not match the model: " + "; ".join(parts))
    module.load_state_dict(state)


def save_toy_model(model, path: str | Path, meta: dict | None = None) -> None:
    """Model-only checkpoint of a ToyFlowModel (config + weights + free-form metadata)."""
    atomic_save(
        {
            "format": TOY_FORMAT,
            "version": 1,
            "model_config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "meta": meta or {},
        },
        path,
    )


def load_toy_model(path: str | Path, device="cpu"):
    """Load a ToyFlowModel checkpoint in eval mode; FdfoError on any problem with the file."""
    from fdfo_fast.models.toy_flow import ToyFlowConfig, ToyFlowModel

    ckpt = read_checkpoint(path, TOY_FORMAT)
    for key in ("model_config", "state_dict"):
        if key not in ckpt:
            raise FdfoError(f"checkpoint {path} lacks {key!r}")
    model = ToyFlowModel(ToyFlowConfig.from_dict(ckpt["model_config"]))
    load_state_dict_strict(model, ckpt["state_dict"], f"checkpoint {path}")
    model.meta = ckpt.get("meta", {})
    return model.to(device).eval()
