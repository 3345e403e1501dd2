"""MAFImageProcessor: the one preprocessing contract of the flows (resize rule, colour mode, [0, 1] output), saved with
the model, loaded by AutoImageProcessor (from a folder, and by Hub id with trust_remote_code), and used by
hf_dgm_training.data.anomaly to build training tensors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from hf_dgm_training.data.anomaly import (
    anomaly_transform,
    images_to_tensor,
    load_anomaly_dataset,
    load_split_as_tensors,
)
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFImageProcessor, MAFModel
from synthetic_data import make_mvtec_category


def random_image(height=20, width=24, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def test_preprocess_resizes_bilinear_and_divides_by_255():
    image = random_image()
    pixel_values = MAFImageProcessor(size=8)(image)["pixel_values"]
    expected = np.asarray(image.resize((8, 8), Image.BILINEAR)).astype(np.float32) / 255.0
    assert pixel_values.shape == (1, 3, 8, 8) and pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values[0], torch.from_numpy(expected).permute(2, 0, 1))
    # The resample filter is configurable, and (x * 255).round() gives back the levels.
    nearest = MAFImageProcessor(size={"height": 6, "width": 10}, resample=Image.NEAREST)(image)["pixel_values"]
    levels = np.asarray(image.resize((10, 6), Image.NEAREST))
    assert torch.equal((nearest[0] * 255).round().byte(), torch.from_numpy(levels.copy()).permute(2, 0, 1))
    uint8 = MAFImageProcessor(size=8, do_rescale=False)(image)["pixel_values"]
    assert uint8.dtype == torch.uint8 and torch.equal(uint8.float() / 255, pixel_values)


def test_colour_modes_follow_num_channels():
    rgb = random_image(8, 8)
    processor = MAFImageProcessor(size=8)
    transparent = Image.fromarray(np.dstack([np.asarray(rgb), np.zeros((8, 8), np.uint8)]), mode="RGBA")
    gray = random_image(8, 8, mode="L")
    batch = processor([rgb, transparent, gray, np.asarray(rgb), np.asarray(rgb).astype(np.float32) / 255,
                       torch.from_numpy(np.array(rgb)).permute(2, 0, 1)])["pixel_values"]
    assert batch.shape == (6, 3, 8, 8)
    assert not batch[1].any()  # fully transparent: composited over black
    assert torch.equal(batch[2][0], batch[2][1]) and torch.equal(batch[2][1], batch[2][2])  # gray levels repeated
    for index in (3, 4, 5):
        assert torch.equal(batch[index], batch[0])

    grayscale = MAFImageProcessor(size=8, num_channels=1)
    single = grayscale([rgb, gray])["pixel_values"]
    assert single.shape == (2, 1, 8, 8)
    assert torch.equal((single[0, 0] * 255).round().byte(), torch.from_numpy(np.array(rgb.convert("L"))))
    assert torch.equal((single[1, 0] * 255).round().byte(), torch.from_numpy(np.array(gray)))


def test_postprocess_inverts_preprocess():
    image = random_image(8, 8)
    processor = MAFImageProcessor(size=8)
    pixel_values = processor(image)["pixel_values"]
    (restored,) = processor.postprocess(pixel_values)
    assert restored.mode == "RGB" and np.array_equal(np.asarray(restored), np.asarray(image))
    assert np.array_equal(processor.postprocess(pixel_values, output_type="np")[0], np.asarray(image))
    gray = MAFImageProcessor(size=8, num_channels=1)
    (restored_gray,) = gray.postprocess(gray(image)["pixel_values"])
    assert restored_gray.mode == "L" and np.array_equal(np.asarray(restored_gray), np.asarray(image.convert("L")))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_channels"):
        MAFImageProcessor(num_channels=2)
    with pytest.raises(ValueError, match="size"):
        MAFImageProcessor(size=0)
    processor = MAFImageProcessor(size=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((8, 8, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="different sizes"):
        processor([random_image(8, 8), random_image(6, 6)], do_resize=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor.postprocess(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="Unexpected arguments"):
        processor(random_image(), image_mean=0.5)


@pytest.mark.parametrize("model_class,config_class", [(MAFModel, MAFConfig), (IAFModel, IAFConfig)])
def test_saved_with_the_model_and_loaded_by_auto_image_processor(tmp_path, model_class, config_class):
    config = config_class(image_size=6, num_channels=1, hidden_sizes=[8], num_blocks=1)
    model_class(config).save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "preprocessor_config.json"))
    assert saved["size"] == {"height": 6, "width": 6} and saved["num_channels"] == 1
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_maf.MAFImageProcessor"
    assert (tmp_path / "image_processing_maf.py").is_file()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is MAFImageProcessor and processor.size == {"height": 6, "width": 6}
    assert MAFImageProcessor.from_model(tmp_path, config).to_dict() == processor.to_dict()

    # A processor that fits the model is kept (e.g. another resample filter saved by a trainer); one that does not
    # (another size) is replaced.
    MAFImageProcessor(size=6, num_channels=1, resample=Image.BICUBIC).save_pretrained(tmp_path)
    model_class(config).save_pretrained(tmp_path)
    assert AutoImageProcessor.from_pretrained(tmp_path).resample == int(Image.BICUBIC)
    MAFImageProcessor(size=12, num_channels=1).save_pretrained(tmp_path)
    model_class(config).save_pretrained(tmp_path)
    assert AutoImageProcessor.from_pretrained(tmp_path).size == {"height": 6, "width": 6}

    # A model folder without a processor (saved before processors existed): the processor of its config.
    os.remove(tmp_path / "preprocessor_config.json")
    fallback = MAFImageProcessor.from_model(tmp_path, config)
    assert fallback.size == {"height": 6, "width": 6} and fallback.num_channels == 1


def test_auto_image_processor_by_hub_id_with_trust_remote_code(hub_server, tmp_path):
    config = MAFConfig(image_size=4, num_channels=3, hidden_sizes=[8], num_blocks=1)
    repo_id = hub_server.repo_id("maf-processor")
    MAFModel(config).push_to_hub(repo_id)
    processor = AutoImageProcessor.from_pretrained(repo_id, trust_remote_code=True, cache_dir=tmp_path)
    assert type(processor).__name__ == "MAFImageProcessor" and processor.size == {"height": 4, "width": 4}
    image = random_image()
    assert torch.equal(processor(image)["pixel_values"], MAFImageProcessor(size=4)(image)["pixel_values"])


def test_training_tensors_come_from_the_processor(tmp_path):
    category = make_mvtec_category(tmp_path / "capsule")
    test = load_anomaly_dataset(str(category), cache_dir=str(tmp_path / "cache"))["test"]
    processor = MAFImageProcessor(size={"height": 6, "width": 8}, resample=Image.NEAREST)
    tensors = load_split_as_tensors(test, image_processor=processor)
    assert torch.equal(tensors.pixel_values, processor(test["image"])["pixel_values"])
    assert tensors.masks.shape == (len(test), 6, 8)
    batch = test.with_transform(anomaly_transform(image_processor=processor))[:2]
    assert torch.equal(batch["pixel_values"], tensors.pixel_values[:2])
    # The default is the processor of the size: RGB, bilinear, / 255.
    default = load_split_as_tensors(test, 8)
    assert torch.equal(default.pixel_values, MAFImageProcessor(size=8)(test["image"])["pixel_values"])
    assert torch.equal(images_to_tensor(test["image"], 8, dtype=torch.float64),
                       MAFImageProcessor(size=8, do_rescale=False)(test["image"])["pixel_values"].double() / 255)
    with pytest.raises(ValueError, match="differs from the image processor"):
        load_split_as_tensors(test, 8, image_processor=processor)
