"""Prompt sources of a run: the shapes world's splits, named prompt sets (GenEval-style COCO), prompt files."""

from __future__ import annotations

import json
from pathlib import Path

from fdfo_fast import coco_prompts
from fdfo_fast.errors import FdfoError
from fdfo_fast.sampling import derive_seed
from fdfo_fast.world.grammar import CATEGORIES, eval_prompts, parse_prompt, prompt_sets


def read_prompt_records(spec: str) -> tuple[tuple[str, dict], ...]:
    """(prompt, metadata) per prompt of a prompt file: one prompt per line ('#' starts a comment, blank lines
    skipped; metadata {}), or for a `.jsonl` file one JSON object per line with a string "prompt" field and any other
    fields as its metadata (GenEval's evaluation_metadata.jsonl: tag, include, ...). FdfoError naming the file and
    line on any problem, including one prompt given twice with different fields (a reward could not tell which)."""
    path = Path(spec)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise FdfoError(f"prompt file {spec} cannot be read ({err})") from None
    if path.suffix.lower() != ".jsonl":
        records = tuple((ln, {}) for ln in lines if ln and not ln.startswith("#"))
        if not records:
            raise FdfoError(f"prompt file {spec} holds no prompts (one per line, '#' starts a comment)")
        return records
    records, first_line = [], {}
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
        text, fields = text.strip(), {k: v for k, v in record.items() if k != "prompt"}
        if text in first_line and fields != records[first_line[text]][1]:
            line_of = [m for m, ln in enumerate(lines, 1) if ln][first_line[text]]
            raise FdfoError(f"prompt file {spec}, line {n}: {text!r} repeats line {line_of} with other fields")
        first_line.setdefault(text, len(records))
        records.append((text, fields))
    if not records:
        raise FdfoError(f'prompt file {spec} holds no prompts (one JSON object with a "prompt" per line)')
    return tuple(records)


def read_prompt_file(spec: str) -> tuple[str, ...]:
    """The prompts of a prompt file (`read_prompt_records` without the metadata)."""
    return tuple(text for text, _ in read_prompt_records(spec))


def prompt_metadata(spec: str, world_grammar: bool) -> dict[str, dict]:
    """prompt -> the metadata the rewards see (`Reward.wants_metadata`) for a --prompts / --eval-prompts source:
    a shapes-world prompt its GenEval-style record (`PromptSpec.geneval_metadata`: tag, include) updated by the
    fields a JSONL file gives it; a named set's prompt its category as `tag`; a prompt file's prompt its fields."""
    if spec in ("train", "heldout"):
        return {p.text(): p.geneval_metadata() for split in prompt_sets().values() for c in CATEGORIES
                for p in split[c]}  # fmt: skip
    if coco_prompts.is_named_set(spec):
        return {p: {"tag": cat} for cat, texts in coco_prompts.prompt_pool(spec).items() for p in texts}
    out = {}
    for text, fields in read_prompt_records(spec):
        out[text] = {**(parse_prompt(text).geneval_metadata() if world_grammar else {}), **fields}
    return out


def merge_metadata(*tables: dict[str, dict]) -> dict[str, dict]:
    """One prompt -> metadata table from several sources (training and evaluation prompts); a prompt the sources
    describe differently is an error."""
    out: dict[str, dict] = {}
    for table in tables:
        for text, fields in table.items():
            if out.setdefault(text, fields) != fields:
                raise FdfoError(f"prompt {text!r} has different metadata in the training and evaluation prompts")
    return out


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
