"""Flow models behind one interface (`base.FlowModel`) and the registry of the kinds `--model` names."""

from fdfo_fast.models.base import MODEL_KINDS, FlowModel, load_model
from fdfo_fast.models.diffusers_flow import FluxFlowModel, SD3FlowModel
from fdfo_fast.models.toy_flow import ToyFlowModel

MODEL_KINDS.update({"toy": ToyFlowModel, "sd3": SD3FlowModel, "flux": FluxFlowModel})

__all__ = ["MODEL_KINDS", "FlowModel", "FluxFlowModel", "SD3FlowModel", "ToyFlowModel", "load_model"]
