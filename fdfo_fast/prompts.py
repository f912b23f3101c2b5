"""Prompt sources of a run: the shapes world's splits, named prompt sets (GenEval-style COCO), prompt files."""

from __future__ import annotations

import json
from pathlib import Path

from fdfo_fast import coco_prompts
from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import derive_seed
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts, parse_prompt, prompt_sets


def read_prompt_file(spec: str) -> tuple[str, ...]:
    """One prompt per line ('#' starts a comment, blank lines skipped), or for a `.jsonl` file one JSON object per
    line with a string "prompt" field (GenEval's evaluation_metadata.jsonl); FdfoError naming the file on any
    problem."""
    path = Path(spec)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise FdfoError(f"prompt file {spec} cannot be read ({err})") from None
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FdfoError(f"prompt file {spec}, line {n}: not JSON ({err})") from None
            text = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise FdfoError(f'prompt file {spec}, line {n}: needs a non-empty string "prompt" field')
            prompts.append(text.strip())
        if not prompts:
            raise FdfoError(f'prompt file {spec} holds no prompts (one JSON object with a "prompt" per line)')
        return tuple(prompts)
    prompts = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not prompts:
        raise FdfoError(f"prompt file {spec} holds no prompts (one per line, '#' starts a comment)")
    return prompts


def load_prompt_pool(spec: str, world_grammar: bool = True) -> dict[str, tuple[str, ...]]:
    """'train' -> the world's training split by category; a named set ('geneval-coco:train', fdfo_fast.coco_prompts)
    -> its prompts by category; otherwise a prompt file (`read_prompt_file`; checked against the shapes world's
    grammar when the run scores with the world's programmatic rewards)."""
    if spec == "train":
        return {c: tuple(p.text() for p in prompt_sets()["train"][c]) for c in CATEGORIES}
    if coco_prompts.is_named_set(spec):
        return coco_prompts.prompt_pool(spec)
    prompts = read_prompt_file(spec)
    for n, p in enumerate(prompts if world_grammar else (), 1):
        try:
            parse_prompt(p)
        except FdfoError as err:
            raise FdfoError(f"prompt file {spec}, prompt {n}: {err}") from None
    return {"file": prompts}


def load_eval_items(spec: str, per_category: int, seed: int) -> list[tuple[object, int]]:
    """The fixed evaluation items (prompt, seed): 'heldout' -> the world's held-out split (categorised PromptSpecs,
    `per_category` each); a named set ('geneval-coco:test') -> `per_category` prompts of each of its categories; a
    prompt file -> each of its prompts once."""
    if spec == "heldout":
        return eval_prompts(per_category)
    if coco_prompts.is_named_set(spec):
        return coco_prompts.eval_items(spec, per_category)
    return [(p, derive_seed(seed, 1, j)) for j, p in enumerate(read_prompt_file(spec))]
