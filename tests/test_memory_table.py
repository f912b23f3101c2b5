"""benchmarks/memory_table.py (docs/memory.md): its parameter counts on the meta device are the counts of the real,
loaded models, its LoRA count is what peft adds, and a published size comes out."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_table  # noqa: E402

from fdfo_fast.config import ModelConfig  # noqa: E402
from fdfo_fast.models.diffusers_flow import SD3FlowModel  # noqa: E402


def test_meta_counts_and_lora_count_match_the_loaded_model_and_peft(sd3_dir):
    """The tiny SD3 pipeline (tests/tiny_diffusers.py) loaded with weights: the script's meta-device count of each
    component equals the loaded one's, and its LoRA count (r·(d_in + d_out) over the targets it matches) equals the
    parameters peft adds when the trainer sets up that LoRA."""
    import diffusers

    model = SD3FlowModel.from_pretrained(sd3_dir, dtype=torch.float32, resolution=32, max_sequence_length=16)
    for name, module in {"transformer": model.transformer, "vae": model.vae, **model.offloadable_modules()}.items():
        loaded = sum(p.numel() for p in module.parameters())
        cls = type(module)
        with torch.device("meta"):
            meta = cls.from_config(module.config) if isinstance(module, diffusers.ModelMixin) else cls(module.config)
        assert memory_table.count_parameters(meta) == loaded > 0, name
        assert all(p.is_meta for p in meta.parameters())
    with torch.device("meta"):
        meta_transformer = type(model.transformer).from_config(model.transformer.config)
    modules, lora = memory_table.lora_parameters(meta_transformer, SD3FlowModel.lora_recipe_targets, rank=4)
    before = sum(p.numel() for p in model.transformer.parameters())
    model.setup_finetune(ModelConfig(model="sd3", finetune="lora", lora_rank=4, lora_alpha=8.0))
    added = {n: p for n, p in model.transformer.named_parameters() if "lora_" in n}
    assert (
        sum(p.numel() for p in added.values())
        == lora
        == sum(p.numel() for p in model.transformer.parameters()) - before
        and modules == len({n.split(".lora_")[0] for n in added}) > 0
    )


def test_flux_dev_counts_the_published_twelve_billion():
    """FLUX.1-dev's transformer from its published config: "a 12 billion parameter rectified flow transformer"
    (black-forest-labs/FLUX.1-dev model card); the count is 11.90 B."""
    import diffusers

    with torch.device("meta"):
        flux = diffusers.FluxTransformer2DModel(**memory_table.FLUX_DEV_CONFIG)
    assert 11.85e9 < memory_table.count_parameters(flux) < 12.0e9


def test_docs_memory_holds_the_tables_the_script_prints():
    """docs/memory.md's tables are the script's output for the current presets (rerun the script after changing a
    preset's models, LoRA rank or reward dtypes)."""
    doc = (ROOT / "docs" / "memory.md").read_text()
    begin, end = "<!-- memory_table.py: begin -->\n", "\n<!-- memory_table.py: end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == memory_table.markdown(memory_table.counts())
