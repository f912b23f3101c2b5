"""Flow models behind one interface (`base.FlowModel`) and the registry of the kinds `--model` names."""

from fdfo_fast.models.base import MODEL_KINDS, FlowModel, load_model
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel
from fdfo_fast.models.flux2 import Flux2FlowModel
from fdfo_fast.models.qwen_image import QwenImageFlowModel
from fdfo_fast.models.toy_flow import ToyFlowModel
from fdfo_fast.models.wan import WanFlowModel

MODEL_KINDS.update(
    {
        cls.kind: cls
        for cls in (ToyFlowModel, SD3FlowModel, FluxFlowModel, Flux2FlowModel, QwenImageFlowModel, WanFlowModel)
    }
)

__all__ = [
    "MODEL_KINDS",
    "FlowModel",
    "Flux2FlowModel",
    "FluxFlowModel",
    "QwenImageFlowModel",
    "SD3FlowModel",
    "ToyFlowModel",
    "WanFlowModel",
    "load_model",
]
