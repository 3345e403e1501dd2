"""hf-dgm: Masked Autoregressive Flow (MAF) and Inverse Autoregressive Flow (IAF) as transformers models."""

from transformers import AutoConfig, AutoModel

from .configuration_maf import IAFConfig, MAFConfig
from .modeling_maf import AnomalyPrediction, IAFModel, MAFModel, MAFModelOutput, MAFPreTrainedModel

AutoConfig.register("maf", MAFConfig, exist_ok=True)
AutoConfig.register("iaf", IAFConfig, exist_ok=True)
AutoModel.register(MAFConfig, MAFModel, exist_ok=True)
AutoModel.register(IAFConfig, IAFModel, exist_ok=True)
# save_pretrained / push_to_hub then write `auto_map` and copy the modeling files, so a Hub repo loads with
# AutoModel.from_pretrained(repo_id, trust_remote_code=True) without this package installed.
MAFConfig.register_for_auto_class()
IAFConfig.register_for_auto_class()
MAFModel.register_for_auto_class("AutoModel")
IAFModel.register_for_auto_class("AutoModel")

__all__ = ["AnomalyPrediction", "MAFConfig", "IAFConfig", "MAFModel", "IAFModel", "MAFModelOutput", "MAFPreTrainedModel"]
