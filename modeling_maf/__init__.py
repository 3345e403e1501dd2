"""hf-dgm: Masked Autoregressive Flow (MAF) and Inverse Autoregressive Flow (IAF) as transformers models."""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .anomaly_scorer_maf import AnomalyPrediction, MAFAnomalyScorer
from .configuration_efficientnet_lite import EfficientNetLiteConfig
from .configuration_feature_maf import FeatureMAFConfig
from .configuration_maf import IAFConfig, MAFConfig
from .image_processing_maf import MAFImageProcessor
from .modeling_efficientnet_lite import (
    EfficientNetLiteBackbone,
    EfficientNetLiteForImageClassification,
    EfficientNetLitePreTrainedModel,
    efficientnet_lite0_weights_file,
    pretrained_efficientnet_lite0,
)
from .modeling_feature_maf import FeatureMAFModel, FeatureMAFOutput
from .modeling_maf import IAFModel, MAFModel, MAFModelOutput, MAFPreTrainedModel
from .patches_maf import PatchLayout
from .pipeline_maf import AnomalyDetectionPipeline


AutoConfig.register("maf", MAFConfig, exist_ok=True)
AutoConfig.register("iaf", IAFConfig, exist_ok=True)
AutoModel.register(MAFConfig, MAFModel, exist_ok=True)
AutoModel.register(IAFConfig, IAFModel, exist_ok=True)
AutoConfig.register("feature_maf", FeatureMAFConfig, exist_ok=True)
AutoModel.register(FeatureMAFConfig, FeatureMAFModel, exist_ok=True)
for _config_class in (MAFConfig, IAFConfig, FeatureMAFConfig):
    try:  # transformers versions that register a processor per backend ("pil", ...)
        AutoImageProcessor.register(_config_class, image_processor_classes={"pil": MAFImageProcessor}, exist_ok=True)
    except TypeError:
        AutoImageProcessor.register(_config_class, slow_image_processor_class=MAFImageProcessor, exist_ok=True)
# save_pretrained / push_to_hub then write `auto_map` and copy the modeling (and processor) files, so a Hub repo loads
# with AutoModel / AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True) without this package installed.
MAFConfig.register_for_auto_class()
IAFConfig.register_for_auto_class()
FeatureMAFConfig.register_for_auto_class()
MAFModel.register_for_auto_class("AutoModel")
IAFModel.register_for_auto_class("AutoModel")
FeatureMAFModel.register_for_auto_class("AutoModel")
MAFImageProcessor.register_for_auto_class("AutoImageProcessor")
# pipeline("anomaly-detection", model=<a MAF, IAF or feature detector>) in this process; saved folders and Hub
# repos name the pipeline in config.json themselves (MAFPreTrainedModel.save_pretrained).
PIPELINE_REGISTRY.register_pipeline("anomaly-detection", pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel,
                                    type="image")
# EfficientNet-Lite, the frozen ImageNet feature backbone: AutoConfig / AutoBackbone / load_backbone know it, and a
# saved backbone folder carries its code (auto_map) like the models above.
AutoConfig.register("efficientnet_lite", EfficientNetLiteConfig, exist_ok=True)
AutoBackbone.register(EfficientNetLiteConfig, EfficientNetLiteBackbone, exist_ok=True)
AutoModelForImageClassification.register(EfficientNetLiteConfig, EfficientNetLiteForImageClassification, exist_ok=True)
EfficientNetLiteConfig.register_for_auto_class()
EfficientNetLiteBackbone.register_for_auto_class("AutoBackbone")
EfficientNetLiteForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["AnomalyPrediction", "MAFConfig", "IAFConfig", "MAFModel", "IAFModel", "MAFModelOutput",
           "MAFPreTrainedModel", "MAFImageProcessor", "AnomalyDetectionPipeline", "EfficientNetLiteConfig",
           "EfficientNetLiteBackbone", "EfficientNetLiteForImageClassification", "EfficientNetLitePreTrainedModel",
           "efficientnet_lite0_weights_file", "pretrained_efficientnet_lite0", "FeatureMAFConfig", "FeatureMAFModel",
           "FeatureMAFOutput"]

