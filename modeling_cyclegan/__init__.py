"""hf-dgm: CycleGAN (Zhu et al. 2017) as a transformers model, with its image processor."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_cyclegan import CycleGANConfig
from .image_processing_cyclegan import CycleGANImageProcessor
from .modeling_cyclegan import (
    LOSS_NAMES,
    CycleGANDiscriminator,
    CycleGANGenerator,
    CycleGANModel,
    CycleGANOutput,
    CycleGANPreTrainedModel,
    gan_loss,
)
from .pipeline_cyclegan import ImageTranslationPipeline


AutoConfig.register("cyclegan", CycleGANConfig, exist_ok=True)
AutoModel.register(CycleGANConfig, CycleGANModel, exist_ok=True)
try:  # transformers versions that register a processor per backend ("pil", ...)
    AutoImageProcessor.register(CycleGANConfig, image_processor_classes={"pil": CycleGANImageProcessor}, exist_ok=True)
except TypeError:
    AutoImageProcessor.register(CycleGANConfig, slow_image_processor_class=CycleGANImageProcessor, exist_ok=True)
# save_pretrained / push_to_hub then write `auto_map` and copy the modeling files, so a Hub repo loads with
# AutoModel.from_pretrained(repo_id, trust_remote_code=True) without this package installed.
CycleGANConfig.register_for_auto_class()
CycleGANModel.register_for_auto_class("AutoModel")
CycleGANImageProcessor.register_for_auto_class("AutoImageProcessor")
# pipeline("image-translation", model=<CycleGANModel>) in this process; saved folders and Hub repos name the pipeline
# in config.json themselves (CycleGANPreTrainedModel.save_pretrained).
PIPELINE_REGISTRY.register_pipeline("image-translation", pipeline_class=ImageTranslationPipeline, pt_model=AutoModel,
                                    type="image")

__all__ = [
    "CycleGANConfig",
    "CycleGANModel",
    "CycleGANPreTrainedModel",
    "CycleGANOutput",
    "CycleGANGenerator",
    "CycleGANDiscriminator",
    "CycleGANImageProcessor",
    "ImageTranslationPipeline",
    "gan_loss",
    "LOSS_NAMES",
]
