"""The `anomaly-detection` pipeline of MAF / IAF: an image in, its anomaly score, verdict and heatmap out.

```python
>>> from transformers import pipeline
>>> detector = pipeline("anomaly-detection", model="runs/maf", trust_remote_code=True)
>>> result = detector("capsule.png")
>>> result["score"], result["is_anomalous"], result["threshold"]
>>> result["heatmap"].save("heatmap.png")
```

This file imports only torch, numpy, PIL and transformers: modeling_maf.py imports it, so `save_pretrained` copies it
next to the model and `config.json` names it under `custom_pipelines`; a Hub repo then gives this pipeline with
`trust_remote_code=True` without the hf-dgm package installed.
"""

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.utils import logging


logger = logging.get_logger(__name__)

UNCALIBRATED_MESSAGE = (
    "This model has no calibration, so is_anomalous and threshold are None (the score alone is meaningful: higher is "
    "more anomalous). Calibrate it on images of good parts and save it: `model.calibrate(good_pixel_values)` "
    "(pixel values (N, C, H, W) in [0, 1]), then `model.save_pretrained(folder)`; the threshold travels with the model."
)


def jet_colors(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue -> cyan -> yellow -> red) of values in [0, 1], as uint8 RGB (..., 3)."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # where red, green and blue peak
    return (np.clip(1.5 - np.abs(4.0 * (values - centres)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The per-pixel map (H, W) in jet colours, resized to the image (bilinear) and blended over it with `alpha`.

    Colours are scaled per image, from the map's 1st percentile (blue) to its 99th (red): a few extreme pixels do not
    wash out the rest. They show where in the image the score comes from, not whether the image is anomalous."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    low, high = (float(value) for value in np.percentile(anomaly_map, [1.0, 99.0]))
    if high <= low:
        low, high = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = np.clip((anomaly_map - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(anomaly_map)
    scaled = np.asarray(Image.fromarray(scaled, mode="F").resize(image.size, resample=Image.BILINEAR))
    colours = Image.fromarray(jet_colors(scaled), mode="RGB")
    return Image.blend(image.convert("RGB"), colours, alpha)


class AnomalyDetectionPipeline(Pipeline):
    r"""
    Scores images with a MAF or IAF trained on good images: the score is the image's negative log-likelihood (nats,
    higher = more anomalous) or the score method the model was calibrated with.

    Call arguments:
        images: an image (PIL image, path, URL or base64 string) or a list of them.
        heatmap_alpha (`float`, *optional*, defaults to 0.5): opacity of the colour map over the image.
        timeout (`float`, *optional*): seconds to wait for an image given by URL.

    Returns:
        for each image a dict with
        - `score` (`float`): the anomaly score,
        - `is_anomalous` (`bool` or `None`): score above the calibrated threshold; `None` for an uncalibrated model,
        - `threshold` (`float` or `None`): the calibrated threshold; `None` for an uncalibrated model,
        - `heatmap` (`PIL.Image`): the per-pixel score map in colour over the input image, at the input's size,
        - `message` (`str` or `None`): for an uncalibrated model, how to calibrate it; `None` otherwise.

    Images are converted to the model's channels (RGB, or gray for one channel), resized to `config.image_size` with
    PIL's bilinear filter and divided by 255, as the training data (modeling_maf.data); a folder with its own image
    processor (`preprocessor_config.json`) uses that instead.
    """

    _load_image_processor = None  # the folder's image processor when it has one

    def _sanitize_parameters(self, heatmap_alpha=None, timeout=None):
        preprocess_params, postprocess_params = {}, {}
        if heatmap_alpha is not None:
            if not 0.0 <= float(heatmap_alpha) <= 1.0:
                raise ValueError(f"heatmap_alpha must lie in [0, 1], got {heatmap_alpha!r}.")
            postprocess_params["heatmap_alpha"] = float(heatmap_alpha)
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        return preprocess_params, {}, postprocess_params

    def __call__(self, images, **kwargs):
        return super().__call__(images, **kwargs)

    def _pixel_values(self, image: Image.Image) -> torch.Tensor:
        if self.image_processor is not None:
            return self.image_processor(image, return_tensors="pt")["pixel_values"]
        config = self.model.config
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")  # transparency over black, as the training data
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        image = image.convert("L" if config.num_channels == 1 else "RGB")
        image = image.resize((config.image_size, config.image_size), resample=Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8).reshape(config.image_size, config.image_size, -1)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255.0

    def preprocess(self, image, timeout=None):
        image = load_image(image, timeout=timeout)
        return {"pixel_values": self._pixel_values(image), "image": [image]}

    def _forward(self, model_inputs):
        pixel_values = model_inputs["pixel_values"]
        scores = self.model.anomaly_scores(pixel_values)
        maps = self.model.anomaly_maps(pixel_values)
        return {"scores": scores, "maps": maps, "image": model_inputs["image"]}

    def postprocess(self, model_outputs, heatmap_alpha=0.5):
        image = model_outputs["image"]
        image = image[0] if isinstance(image, list) else image
        score = float(model_outputs["scores"].reshape(-1)[0])
        anomaly_map = model_outputs["maps"].reshape(model_outputs["maps"].shape[-2:]).float().cpu().numpy()
        logger.warning_once(UNCALIBRATED_MESSAGE)
        return {
            "score": score,
            "is_anomalous": None,
            "threshold": None,
            "heatmap": heatmap_overlay(image, anomaly_map, alpha=heatmap_alpha),
            "message": UNCALIBRATED_MESSAGE,
        }


__all__ = ["AnomalyDetectionPipeline", "heatmap_overlay", "jet_colors", "UNCALIBRATED_MESSAGE"]
