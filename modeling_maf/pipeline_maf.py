"""The `anomaly-detection` pipeline of MAF / IAF: an image in, its anomaly score, verdict and heatmap out.

```python
>>> from transformers import pipeline
>>> detector = pipeline("anomaly-detection", model="runs/maf", trust_remote_code=True)
>>> result = detector("capsule.png")
>>> result["score"], result["is_anomalous"], result["threshold"], result["method"]
>>> result["heatmap"].save("heatmap.png")
>>> detector("capsule.png", colorbar=True)["heatmap"]   # enlarged, with its colour bar and the threshold marked
```

This file imports only torch, numpy, PIL, transformers and its siblings (anomaly scores, heatmaps, image processor):
modeling_maf.py imports it, so `save_pretrained` copies it next to the model and `config.json` names it under
`custom_pipelines`; a Hub repo then gives this pipeline with `trust_remote_code=True` without the hf-dgm package
installed.
"""

import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .anomaly_scores import NOT_CALIBRATED
from .heatmap_maf import heatmap_overlay, heatmap_scale, jet_colors, with_colorbar
from .image_processing_maf import MAFImageProcessor


class AnomalyDetectionPipeline(Pipeline):
    r"""
    Scores images with a MAF or IAF trained on good images (`MAFModel.predict_anomalies`): the model's calibrated
    score and threshold, or, for a model that is not calibrated, the image's negative log-likelihood (nats) alone.

    Call arguments:
        images: an image (PIL image, path, URL or base64 string) or a list of them.
        heatmap_alpha (`float`, *optional*, defaults to 0.5): opacity of the colour map over the image.
        colorbar (`bool`, *optional*, defaults to False): return the heatmap enlarged to at least 256 pixels with its
            colour bar (threshold marked) to the right, instead of the overlay at the input's size.
        timeout (`float`, *optional*): seconds to wait for an image given by URL.

    Returns:
        for each image a dict with
        - `score` (`float`): the anomaly score, higher = more anomalous,
        - `is_anomalous` (`bool` or `None`): score above the calibrated threshold; `None` for an uncalibrated model,
        - `threshold` (`float` or `None`): the calibrated threshold; `None` for an uncalibrated model,
        - `heatmap` (`PIL.Image`): the score's per-pixel map in colour over the input image, at the input's size
          (with `colorbar`, enlarged and with its colour bar),
        - `heatmap_scale` (`dict`): its colour scale, `low` (blue), `high` (dark red), `threshold` (the map level of
          the decision, None on a per-image scale) and `note` (why the scale is per image, None otherwise). A
          calibrated model's scale comes from its good validation images and is the same for every image
          (`modeling_maf.heatmap_maf`); otherwise colours are scaled per image,
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

    def _sanitize_parameters(self, heatmap_alpha=None, timeout=None, colorbar=None):
        preprocess_params, postprocess_params = {}, {}
        if heatmap_alpha is not None:
            if not 0.0 <= float(heatmap_alpha) <= 1.0:
                raise ValueError(f"heatmap_alpha must lie in [0, 1], got {heatmap_alpha!r}.")
            postprocess_params["heatmap_alpha"] = float(heatmap_alpha)
        if colorbar is not None:
            postprocess_params["colorbar"] = bool(colorbar)
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
                "threshold": threshold, "method": [prediction.method] * batch_size,
                "display_range": [prediction.display_range] * batch_size, "image": model_inputs["image"]}

    def postprocess(self, model_outputs, heatmap_alpha=0.5, colorbar=False):
        image, method, display_range = (value[0] if isinstance(value, list) else value for value in (
            model_outputs["image"], model_outputs["method"], model_outputs["display_range"]))
        anomaly_map = model_outputs["maps"].reshape(model_outputs["maps"].shape[-2:]).float().cpu().numpy()
        calibrated = model_outputs["is_anomalous"] is not None
        scale = heatmap_scale(anomaly_map, display_range, calibrated)
        heatmap = heatmap_overlay(image, anomaly_map, alpha=heatmap_alpha, scale=scale)
        return {
            "score": float(model_outputs["scores"].reshape(-1)[0]),
            "is_anomalous": bool(model_outputs["is_anomalous"].reshape(-1)[0]) if calibrated else None,
            "threshold": float(model_outputs["threshold"].reshape(-1)[0]) if calibrated else None,
            "heatmap": with_colorbar(heatmap, scale) if colorbar else heatmap,
            "heatmap_scale": scale.to_dict(),
            "method": method,
            "message": None if calibrated else NOT_CALIBRATED,
        }


__all__ = ["AnomalyDetectionPipeline", "heatmap_overlay", "heatmap_scale", "jet_colors", "with_colorbar"]
