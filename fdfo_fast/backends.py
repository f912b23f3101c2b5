"""Which backend each op runs on, decided in one place.

- `ENV_SWITCHES`: every environment switch the package honours (name -> meaning), read only through `env_value` /
  `env_flag` (per call, so tests can toggle them).
- `resolve(op, requested, *tensors)`: the implementation of one op call, in one vocabulary:
      sampler_step, fd_loss   requested None (auto) | "ref" | "triton"  -> "triton" | "ref"
      reward_preprocess       requested None (auto) | "ref" | "ext"     -> "ext" | "ref"
  An explicit request that cannot run raises FdfoError with the reason; auto falls back with one warning per op.
  `choose_impl(op, impl, *tensors)` is the Triton ops' resolver (the kernels call it).
- `used_backends()`: what the ops actually resolved to since `reset_used_backends()` (for the run log).
- `cuda_graphs_choice(...)`: --cuda-graph auto|on|off -> whether rollouts sample through a captured CUDA graph.
- `table()`: the rows `python -m fdfo_fast.info` prints; detection imports no heavy package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os

import torch

from fdfo_fast.errors import FdfoError

_log = logging.getLogger("fdfo_fast")

OPTIONAL_PACKAGES = (
    "triton",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "flash_attn",
    "xformers",
    "wandb",
)

# Every environment switch, name -> meaning. A flag is on for 1/true/yes/on (any case), as Triton parses its own.
ENV_SWITCHES = {
    "FDFO_DISABLE_TRITON": "1: never run the Triton kernels (auto takes the reference, impl='triton' raises)",
    "FDFO_DISABLE_AUTOTUNE": "1: the Triton kernels use their default launch shape (no timing of candidates; "
    "the in-kernel sums then repeat bit for bit across runs and machines of one GPU model)",
    "TRITON_INTERPRET": "1: Triton's interpreter runs the kernels on CPU tensors (tests; Triton reads it too)",
    "FDFO_DISABLE_EXT": "1: never load or build the C++ extension (auto takes the reference, impl='ext' raises)",
    "FDFO_EXT_VERBOSE": "1: print the C++ extension's full JIT build log",
    "FDFO_BUILD_EXT": "1 at `pip install --no-build-isolation -e .`: build fdfo_fast._C ahead of time (setup.py)",
    "FDFO_BUILD_CUDA": "auto|0|1 with FDFO_BUILD_EXT=1: override the CUDA toolkit detection (setup.py)",
}
_TRUE = ("1", "true", "yes", "on")


def env_value(name: str) -> str | None:
    """The raw value of one switch of `ENV_SWITCHES` (None when unset): the only reader of those variables."""
    if name not in ENV_SWITCHES:
        raise KeyError(f"{name} is not an environment switch of fdfo_fast (see backends.ENV_SWITCHES)")
    return os.environ.get(name)


def env_flag(name: str) -> bool:
    return (env_value(name) or "0").lower() in _TRUE


def package_version(name: str) -> str | None:
    """Installed version of a distribution (or None) - reads metadata, imports nothing."""
    if importlib.util.find_spec(name) is None:
        return None
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = package_version("triton") is not None
HAS_CUDA_EXT = importlib.util.find_spec("fdfo_fast._C") is not None

# op -> (its explicit choices); None asks for auto
OPS = {"sampler_step": ("ref", "triton"), "fd_loss": ("ref", "triton"), "reward_preprocess": ("ref", "ext")}
_warned: set[str] = set()  # ops whose auto fallback was already reported
_used: dict[str, set[str]] = {}  # op -> choices since reset_used_backends()


# ---------------------------------------------------------------------------------------------------------------
# Triton ops
# ---------------------------------------------------------------------------------------------------------------
def triton_usable() -> tuple[bool, str]:
    """(usable, why not) for Triton in this process: installed, not disabled, and a GPU or the interpreter."""
    if env_flag("FDFO_DISABLE_TRITON"):
        return False, "disabled by FDFO_DISABLE_TRITON=1"
    if not HAS_TRITON:
        return False, "triton is not installed (pip install -e '.[triton]' in the fdfo_fast checkout)"
    return True, ""


def interpreter_on() -> bool:
    return env_flag("TRITON_INTERPRET")


def _triton_choice(op: str, impl: str | None, tensors: tuple[torch.Tensor, ...]) -> str:
    if impl not in (None, "ref", "triton"):
        raise FdfoError(f"{op}: impl must be one of None, 'ref', 'triton'; got {impl!r}")
    if impl == "ref":
        return "ref"
    on_cuda = all(t.is_cuda for t in tensors)
    ok, why = triton_usable()
    if impl == "triton":
        if not ok:
            raise FdfoError(f"{op}: impl='triton' requested but {why}")
        if not on_cuda and not interpreter_on():
            raise FdfoError(f"{op}: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        return "triton"
    if on_cuda and ok:
        return "triton"
    if on_cuda and op not in _warned:  # a GPU run that cannot use its kernels deserves one warning
        _warned.add(op)
        _log.warning("%s: using the PyTorch reference on CUDA (%s)", op, why)
    return "ref"


def choose_impl(op: str, impl: str | None, *tensors: torch.Tensor) -> str:
    """ "triton" | "ref" for one call of a Triton op: auto = Triton on CUDA tensors, reference elsewhere (one warning
    when a GPU run cannot use its kernels); an explicit "triton" that cannot run raises. The answer is recorded."""
    choice = _triton_choice(op, impl, tensors)
    record_backend(op, choice)
    return choice


# ---------------------------------------------------------------------------------------------------------------
# The C++/CUDA reward-preprocessing extension
# ---------------------------------------------------------------------------------------------------------------
def _ext_choice(impl: str | None) -> str:
    if impl not in (None, "ref", "ext"):
        raise FdfoError(f"reward preprocessing: impl must be one of None, 'ref', 'ext'; got {impl!r}")
    if impl == "ref":
        return "ref"
    from fdfo_fast._ext import extension_status, load_extension

    if impl == "ext":
        load_extension()  # raises FdfoError with the reason
        return "ext"
    ok, why = extension_status()  # may trigger the one-time build
    if not ok and "reward_preprocess" not in _warned:
        _warned.add("reward_preprocess")
        _log.warning("reward preprocessing uses the PyTorch reference: %s", why)
    return "ext" if ok else "ref"


# ---------------------------------------------------------------------------------------------------------------
# The resolver and its record
# ---------------------------------------------------------------------------------------------------------------
def resolve(op: str, requested: str | None, *tensors: torch.Tensor) -> str:
    """The implementation one call of `op` runs: "triton" | "ref" (sampler_step, fd_loss) or "ext" | "ref"
    (reward_preprocess). `requested` None is auto; `tensors` are the call's inputs (Triton needs them on CUDA)."""
    if op not in OPS:
        raise FdfoError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if op == "reward_preprocess":
        choice = _ext_choice(requested)
        record_backend(op, choice)
        return choice
    return choose_impl(op, requested, *tensors)


def record_backend(op: str, choice: str) -> None:
    """Note that `op` ran as `choice` (the resolvers call this; a CUDA-graph replay, which resolves nothing, too)."""
    _used.setdefault(op, set()).add(choice)


def used_backends() -> dict[str, str]:
    """op -> what it ran on since the last `reset_used_backends()`; an op that took several answers reads
    e.g. "ref+triton". Ops not called since the reset are absent."""
    return {op: "+".join(sorted(choices)) for op, choices in sorted(_used.items())}


def reset_used_backends() -> None:
    _used.clear()


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------------------
def cuda_graphs_choice(choice: str, device: torch.device, impl: str | None, zero_stage: int) -> bool:
    """--cuda-graph auto|on|off -> whether the rollouts sample through `CudaGraphSampler`; "on" with a reason it
    cannot work raises, "auto" then samples eagerly."""
    problems = []
    if device.type != "cuda":
        problems.append("sampling runs on the CPU")
    if impl == "ref":
        problems.append("--impl ref replays its noise on the CPU")
    if zero_stage == 3:
        problems.append("ZeRO-3 re-gathers the weights on every call")
    if choice == "on" and problems:
        raise FdfoError(f"--cuda-graph on: {'; '.join(problems)}")
    return choice == "on" or (choice == "auto" and not problems)


# ---------------------------------------------------------------------------------------------------------------
# `python -m fdfo_fast.info`
# ---------------------------------------------------------------------------------------------------------------
def _extension_row() -> str:
    """Status of the reward-preprocessing extension without triggering a build (sources found? built? can build?)."""
    from fdfo_fast._ext import build_readiness

    return build_readiness()


def table() -> list[tuple[str, str, str]]:
    """(component, version or '-', status) rows for `python -m fdfo_fast.info`, then one row per switch of
    `ENV_SWITCHES` that is set (name, value, meaning)."""
    rows = [("python", _py(), "ok"), ("torch", torch.__version__, "ok")]
    if HAS_CUDA:
        rows.append(("cuda", str(torch.version.cuda), f"ok: {torch.cuda.get_device_name(0)}"))
    else:
        rows.append(("cuda", str(torch.version.cuda or "-"), "no GPU: pure-PyTorch reference paths"))
    for name in OPTIONAL_PACKAGES:
        ver = package_version(name)
        status = "installed" if ver else "not installed"
        if name == "triton" and ver:
            if env_flag("FDFO_DISABLE_TRITON"):
                status = "disabled by FDFO_DISABLE_TRITON"
            elif HAS_CUDA:
                status = "ok: kernels on CUDA tensors"
            else:
                status = "interpreter only (TRITON_INTERPRET=1, tests)" if interpreter_on() else "no GPU: unused"
        rows.append((name, ver or "-", status))
    rows.append(("fdfo_fast._C", "-", _extension_row()))
    for name, meaning in ENV_SWITCHES.items():
        value = env_value(name)
        if value is not None:
            rows.append((name, value, meaning))
    return rows


def _py() -> str:
    import platform

    return platform.python_version()
