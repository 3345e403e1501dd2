"""The `image-translation` pipeline of CycleGAN: images in, translated PIL images out.

```python
>>> from transformers import pipeline
>>> translator = pipeline("image-translation", model="runs/h2z", trust_remote_code=True)
>>> zebra = translator("horse.jpg")                          # a_to_b by default
>>> horse = translator(zebra, direction="b_to_a")
```

transformers 5 refuses the task name `image-to-image`, hence `image-translation`. This file imports only torch,
transformers, PIL and its sibling image processor: modeling_cyclegan.py imports it, so `save_pretrained` copies it
next to the model and `config.json` names it under `custom_pipelines`; a Hub repo then gives this pipeline with
`trust_remote_code=True` without the hf-dgm package installed.
"""

import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image

from .image_processing_cyclegan import CycleGANImageProcessor


DIRECTIONS = ("a_to_b", "b_to_a")


class ImageTranslationPipeline(Pipeline):
    r"""
    Translates images with one of the two CycleGAN generators.

    Call arguments:
        images: an image (PIL image, path, URL or base64 string) or a list of them.
        direction (`str`, *optional*, defaults to `"a_to_b"`): `"a_to_b"` (generator G_A) or `"b_to_a"` (G_B).
        keep_input_size (`bool`, *optional*, defaults to `False`): by default the output has the size the image
            processor resizes to (the model's training size); `True` resizes the translation back to the input's
            width and height (bicubic).
        timeout (`float`, *optional*): seconds to wait for an image given by URL.

    Returns:
        one PIL image (RGB) for one input, a list of PIL images for a list.

    Images are preprocessed with the model folder's image processor (`preprocessor_config.json`, written by
    scripts/train_cyclegan.py) or, when the folder has none, with a [`CycleGANImageProcessor`] that resizes to
    `config.image_size`: the same as `CycleGANModel.translate`.
    """

    _load_image_processor = None  # the folder's image processor when it has one (see __init__ otherwise)
    TASK = "image-translation"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = CycleGANImageProcessor(size=self.model.config.image_size)

    def _sanitize_parameters(self, direction=None, keep_input_size=None, timeout=None):
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if direction is not None:
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be 'a_to_b' or 'b_to_a', got {direction!r}.")
            forward_params["direction"] = direction
        if keep_input_size is not None:
            postprocess_params["keep_input_size"] = bool(keep_input_size)
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, images, **kwargs):
        return super().__call__(images, **kwargs)

    # Copied from modeling_maf.pipeline_maf.AnomalyDetectionPipeline._read_image
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
        return {"pixel_values": pixel_values, "input_size": torch.tensor([[image.width, image.height]])}

    def _forward(self, model_inputs, direction="a_to_b"):
        pixel_values = model_inputs["pixel_values"]
        return {"translated": self.model.translate(pixel_values, direction=direction),
                "input_size": model_inputs["input_size"]}

    def postprocess(self, model_outputs, keep_input_size=False):
        image = self.image_processor.postprocess(model_outputs["translated"], output_type="pil")[0]
        if keep_input_size:
            width, height = (int(value) for value in model_outputs["input_size"].reshape(-1))
            if image.size != (width, height):
                image = image.resize((width, height), resample=Image.BICUBIC)
        return image


__all__ = ["ImageTranslationPipeline", "DIRECTIONS"]
