"""Checkpoint files: atomic writes, and loads that fail with one clear line on a missing, corrupt or mismatched file."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fdfo_fast.errors import FdfoError

TOY_FORMAT = "fdfo_fast.toy_flow"
# The shipped toy base model (see README: how it was produced).
TOY_BASE_CHECKPOINT = Path(__file__).parent / "assets" / "toy_base.pt"


def write_error(path: str | Path, err: BaseException) -> FdfoError:
    """One line for a failed write of `path`: a full disk, a read-only filesystem, a missing permission, a path
    under a file. torch.save buries ENOSPC in a long RuntimeError; its text is searched for the cause."""
    errno_ = getattr(err, "errno", None)
    text = str(err)
    if errno_ == errno.ENOSPC or "No space left on device" in text:
        return FdfoError(f"no space left on device while writing {path}")
    if errno_ == errno.EROFS:
        return FdfoError(f"cannot write {path}: read-only file system")
    why = getattr(err, "strerror", None) or (text.splitlines()[0][:200] if text else type(err).__name__)
    return FdfoError(f"cannot write {path}: {why}")


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it) and put back at once
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename over `path`, fsync the folder: a crash leaves
    the old file or the new one, never a partial one; on any error the temp file is removed and the old file kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600: the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # torch.save reports a full device as "unexpected pos N vs M" (its writer's own check): ask the filesystem,
        # while the partial temp file still holds the space it took
        full = isinstance(err, RuntimeError) and _free_bytes(path.parent) < (1 << 20)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise FdfoError(f"no space left on device while writing {path}") from None
        if isinstance(err, (OSError, RuntimeError)):
            raise write_error(path, err) from None
        raise
    _fsync_dir(path.parent)


def atomic_save(obj, path: str | Path) -> None:
    """torch.save, atomically (`_atomic_write`); FdfoError naming the path and the cause on a failed write."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file (UTF-8), atomically (`_atomic_write`)."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


# What our atomic writes leave behind when a process dies mid-write: `.<name>.<random>.tmp` beside the file, the
# exports' `<name>.tmp` / `<name>.old` folders (run_state.RunCheckpoint._export) and the snapshots'
# `<export>_snapshots/epoch_NNNNN.tmp` / `.old` (RunCheckpoint._snapshot).
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.jsonl", "config.yaml", "config.json")
RUN_FOLDERS = ("lora", "best_lora", "transformer", "best_transformer")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the partial files a killed run left in its folder (only our own patterns); returns what went."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for p in folder.iterdir():
        ours = any(p.name.startswith(f".{name}.") and p.name.endswith(".tmp") for name in RUN_FILES) and p.is_file()
        ours_dir = p.is_dir() and any(p.name in (f"{n}.tmp", f"{n}.old") for n in RUN_FOLDERS)
        if ours or ours_dir:
            shutil.rmtree(p, ignore_errors=True) if ours_dir else p.unlink(missing_ok=True)
            gone.append(p)
        elif p.is_dir() and p.name in (f"{n}_snapshots" for n in RUN_FOLDERS):
            for snap in p.iterdir():
                if snap.is_dir() and snap.name.startswith("epoch_") and snap.name.endswith((".tmp", ".old")):
                    shutil.rmtree(snap, ignore_errors=True)
                    gone.append(snap)
    return gone


def read_checkpoint(path: str | Path, expected_format: str | None = None, mmap: bool = False) -> dict:
    """torch.load a checkpoint dict (weights_only) or raise FdfoError naming the file and the problem; `mmap` maps
    the tensors instead of reading them (a caller that needs only the small fields)."""
    path = Path(path)
    if not path.exists():
        raise FdfoError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise FdfoError(f"checkpoint {path} is a directory, expected a .pt file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
