"""The `anomaly-detection` pipeline of MAF / IAF: an image in, its anomaly score, verdict and heatmap out.

```python
>>> from transformers import pipeline
>>> detector = pipeline("anomaly-detection", model="runs/maf", trust_remote_code=True)
>>> result = detector("capsule.png")
>>> result["score"], result["is_anomalous"], result["threshold"], result["method"]
>>> result["heatmap"].save("heatmap.png")
```

This file imports only torch, numpy, PIL, transformers and its siblings (anomaly scores, image processor):
modeling_maf.py imports it, so `save_pretrained` copies it next to the model and `config.json` names it under
`custom_pipelines`; a Hub repo then gives this pipeline with `trust_remote_code=True` without the hf-dgm package
installed.
"""

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .anomaly_scores import NOT_CALIBRATED
from .image_processing_maf import MAFImageProcessor


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
    Scores images with a MAF or IAF trained on good images (`MAFModel.predict_anomalies`): the model's calibrated
    score and threshold, or, for a model that is not calibrated, the image's negative log-likelihood (nats) alone.

    Call arguments:
        images: an image (PIL image, path, URL or base64 string) or a list of them.
        heatmap_alpha (`float`, *optional*, defaults to 0.5): opacity of the colour map over the image.
        timeout (`float`, *optional*): seconds to wait for an image given by URL.

    Returns:
        for each image a dict with
        - `score` (`float`): the anomaly score, higher = more anomalous,
        - `is_anomalous` (`bool` or `None`): score above the calibrated threshold; `None` for an uncalibrated model,
        - `threshold` (`float` or `None`): the calibrated threshold; `None` for an uncalibrated model,
        - `heatmap` (`PIL.Image`): the score's per-pixel map in colour over the input image, at the input's size,
        - `method` (`str`): the score's name (`modeling_maf.anomaly_scores.ANOMALY_SCORES`; "nll" uncalibrated),
        - `message` (`str` or `None`): for an uncalibrated model, how to calibrate it; `None` otherwise.

    Images are preprocessed by the model folder's [`MAFImageProcessor`] (`preprocessor_config.json`, saved with every
    model) or, for a folder without one, by the processor of the model's config: the model's channels (RGB or gray),
    `config.image_size`, values in [0, 1], as the training data.
    """

    _load_image_processor = None  # the folder's image processor when it has one (see __init__ otherwise)
    TASK = "anomaly-detection"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = MAFImageProcessor.from_model_config(self.model.config)

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

    def _read_image(self, image, timeout=None):
        """The input as a PIL image, or one clear error: a missing file or a file that is not an image is a
        ValueError naming it; anything but a PIL image, a path, a URL or a base64 string is a TypeError."""
        import os
        import re

        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, Image.Image):
            return load_image(image, timeout=timeout)
        if not isinstance(image, str):
            raise TypeError(f"The {self.TASK} pipeline takes an image: a PIL image, a file path, a URL or a base64 "
                            f"string (or a list of them); got {type(image).__name__} {image!r:.80}.")
        is_url = image.startswith(("http://", "https://"))
        looks_base64 = len(image) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", image) is not None
        if not is_url and not os.path.exists(image) and not looks_base64:
            where = "" if os.path.isabs(image) else f" (looked in {os.path.abspath(image)})"
            raise ValueError(f"{image} does not exist{where}: pass the path of an image file, a URL or a PIL image.")
        if os.path.isdir(image):
            raise ValueError(f"{image} is a folder; pass the path of one image file (or a list of them).")
        try:
            return load_image(image, timeout=timeout)
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            what = image if len(image) < 200 else f"{image[:60]}..."
            raise ValueError(f"{what} is not an image that can be read ({' '.join(str(error).split())}); pass a PNG, "
                             "JPEG or other image file.") from error

    def preprocess(self, image, timeout=None):
        image = self._read_image(image, timeout=timeout)
        pixel_values = self.image_processor(image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "image": [image]}

    def _forward(self, model_inputs):
        prediction = self.model.predict_anomalies(model_inputs["pixel_values"])
        batch_size = prediction.scores.shape[0]
        threshold = None if prediction.threshold is None else torch.full((batch_size,), prediction.threshold,
                                                                         dtype=torch.float64)
        # Every entry has one element per image, so that batched outputs split back into images.
        return {"scores": prediction.scores, "maps": prediction.maps, "is_anomalous": prediction.is_anomalous,
                "threshold": threshold, "method": [prediction.method] * batch_size, "image": model_inputs["image"]}

    def postprocess(self, model_outputs, heatmap_alpha=0.5):
        image, method = (value[0] if isinstance(value, list) else value
                         for value in (model_outputs["image"], model_outputs["method"]))
        anomaly_map = model_outputs["maps"].reshape(model_outputs["maps"].shape[-2:]).float().cpu().numpy()
        calibrated = model_outputs["is_anomalous"] is not None
        return {
            "score": float(model_outputs["scores"].reshape(-1)[0]),
            "is_anomalous": bool(model_outputs["is_anomalous"].reshape(-1)[0]) if calibrated else None,
            "threshold": float(model_outputs["threshold"].reshape(-1)[0]) if calibrated else None,
            "heatmap": heatmap_overlay(image, anomaly_map, alpha=heatmap_alpha),
            "method": method,
            "message": None if calibrated else NOT_CALIBRATED,
        }


__all__ = ["AnomalyDetectionPipeline", "heatmap_overlay", "jet_colors"]
