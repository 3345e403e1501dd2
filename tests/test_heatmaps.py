"""One colour scale for the heatmaps (modeling_maf/heatmap_maf.py and anomaly_scores.display_range): calibration
stores a display range per score, save_pretrained / from_pretrained keep it, an image gets the same colours whatever
else is in its batch, models calibrated before display ranges existed fall back to a per-image scale with a note, and
the colour bar marks the threshold where the scale puts it."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_maf import IAFModel, MAFModel
from modeling_maf.anomaly_scores import (
    ANOMALY_SCORES,
    DISPLAY_LOW_PERCENTILE,
    DISPLAY_THRESHOLD_POSITION,
    display_range,
    threshold_at_fpr,
)
from modeling_maf.heatmap_maf import (
    NO_DISPLAY_RANGE_NOTE,
    NOT_CALIBRATED_NOTE,
    HeatmapScale,
    colorbar_image,
    heatmap_overlay,
    heatmap_scale,
    jet_colors,
    with_colorbar,
)
from test_anomaly_scores import images, tiny_model, with_defect


LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy_models")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny MAF calibrated on 10 random 'good' images and saved; returns (folder, model, good images)."""
    model = tiny_model(seed=4, num_channels=3)
    good = images(10, 7, num_channels=3)
    model.calibrate(good, target_fpr=0.2)
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    model.save_pretrained(folder)
    return folder, model, good


def test_display_range_puts_the_threshold_at_its_position_of_the_bar():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.gamma(2.0, 1.0, size=(8, 5, 5)))
    low = float(np.sort(maps.numpy().ravel())[round(DISPLAY_LOW_PERCENTILE / 100 * maps.numel()) - 1])
    # A peak score: the map level of the decision is the threshold itself.
    peak = display_range(maps, 7.5, in_map_units=True, target_fpr=0.25)
    assert peak["map_threshold"] == 7.5 and peak["low"] == pytest.approx(low) and peak["label"] == "threshold"
    assert (peak["map_threshold"] - peak["low"]) / (peak["high"] - peak["low"]) == \
        pytest.approx(DISPLAY_THRESHOLD_POSITION)
    # A sum score (the image NLL): the level that the good maps' maxima exceed at the target rate.
    total = display_range(maps, 1e6, in_map_units=False, target_fpr=0.25)
    assert total["map_threshold"] == threshold_at_fpr(maps.flatten(1).max(dim=1).values, 0.25)[0]
    assert total["label"] == "good peak"
    # A threshold below the typical good value still gives a scale that ends above it.
    low_threshold = display_range(maps, -5.0, in_map_units=True, target_fpr=0.25)
    assert low_threshold["low"] < low_threshold["map_threshold"] == -5.0 < low_threshold["high"]
    assert [name for name, score in ANOMALY_SCORES.items() if not score.in_map_units] == ["nll", "positive-z-sum"]


def test_calibration_saves_a_display_range_per_score_and_loading_keeps_it(calibrated):
    folder, model, good = calibrated
    ranges = model.config.anomaly_calibration["display_ranges"]
    assert set(ranges) == set(model.config.anomaly_calibration["thresholds"])
    for name, scale in ranges.items():
        assert scale["low"] < scale["map_threshold"] < scale["high"], name
        if ANOMALY_SCORES[name].in_map_units:
            assert scale["map_threshold"] == model.anomaly_threshold(name)
    # The default score's range from the maps of the good images (a pixel-grid score: no statistics needed).
    maps = model.anomaly_maps(good, "map-max")
    assert ranges["map-max"] == display_range(maps, model.anomaly_threshold("map-max"), True, 0.2)

    saved = json.loads((folder / "config.json").read_text())["anomaly_calibration"]["display_ranges"]
    assert saved == ranges  # plain JSON in config.json
    loaded = MAFModel.from_pretrained(folder).eval()
    assert loaded.config.anomaly_calibration["display_ranges"] == ranges
    for name in ranges:
        assert loaded.anomaly_display_range(name) == ranges[name]
        assert loaded.predict_anomalies(good[:2], name).display_range == ranges[name]
    assert loaded.predict_anomalies(good[:2]).display_range == ranges[loaded.resolve_anomaly_method()]


def test_an_image_gets_the_same_colours_whatever_else_is_in_the_batch(calibrated):
    folder, model, good = calibrated
    image = images(1, 20, num_channels=3)
    batches = [image, torch.cat([image, with_defect(images(2, 21, num_channels=3))]),
               torch.cat([images(3, 22, num_channels=3) * 0.1, image])]
    picture = Image.new("RGB", (6, 6), (40, 40, 40))
    shown = []
    for batch in batches:
        prediction = model.predict_anomalies(batch)
        row = next(index for index in range(len(batch)) if torch.equal(batch[index], image[0]))
        anomaly_map = prediction.maps[row].numpy()
        scale = heatmap_scale(anomaly_map, prediction.display_range, calibrated=True)
        shown.append(np.asarray(heatmap_overlay(picture, anomaly_map, alpha=1.0, scale=scale)))
    assert all(np.array_equal(shown[0], other) for other in shown[1:])
    # The same through the pipeline, one image at a time and batched with a defective image.
    detector = pipeline("anomaly-detection", model=str(folder), trust_remote_code=True, device="cpu")
    pictures = [Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)),
                Image.fromarray(np.full((6, 6, 3), 255, np.uint8))]
    alone = detector(pictures[0])
    together = detector(pictures, batch_size=2)
    assert alone["heatmap_scale"] == together[0]["heatmap_scale"] == together[1]["heatmap_scale"]
    assert np.abs(np.asarray(alone["heatmap"], int) - np.asarray(together[0]["heatmap"], int)).max() <= 1
    # What the test guards against: a range taken over the batch's maps changes an image's colours.
    maps = model.predict_anomalies(batches[1]).maps.numpy()
    batch_scale = HeatmapScale(*np.percentile(maps, [1, 99.9]).tolist())
    assert not np.array_equal(np.asarray(heatmap_overlay(picture, maps[0], alpha=1.0, scale=batch_scale)), shown[0])


@pytest.mark.parametrize("name", ["maf", "patch_maf", "iaf"])
def test_a_model_calibrated_before_display_ranges_is_scaled_per_image_with_a_note(name):
    folder = os.path.join(LEGACY, name)
    assert "display_ranges" not in json.loads(open(os.path.join(folder, "config.json")).read())["anomaly_calibration"]
    model_class = IAFModel if name == "iaf" else MAFModel  # the fixtures hold no code: this package's pipeline
    detector = pipeline("anomaly-detection", model=model_class.from_pretrained(folder).eval(), device="cpu")
    assert detector.model.anomaly_display_range() is None
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    result = detector(picture)
    assert result["is_anomalous"] is not None  # still calibrated: thresholds and decisions as before
    assert result["heatmap_scale"]["note"] == NO_DISPLAY_RANGE_NOTE and result["heatmap_scale"]["threshold"] is None
    assert result["heatmap"].size == picture.size
    legend = detector(picture, colorbar=True)["heatmap"]
    assert legend.height >= 256 and legend.width > legend.height


def test_uncalibrated_scale_is_per_image_with_its_note():
    anomaly_map = np.tile(np.linspace(0.0, 1.0, 20, dtype=np.float32), (20, 1))
    scale = heatmap_scale(anomaly_map)
    assert scale.per_image and scale.note == NOT_CALIBRATED_NOTE and scale.threshold is None
    assert (scale.low, scale.high) == pytest.approx(tuple(np.percentile(anomaly_map, [1, 99])))
    assert heatmap_scale(anomaly_map, calibrated=True).note == NO_DISPLAY_RANGE_NOTE
    calibrated = heatmap_scale(anomaly_map, {"low": 0.0, "high": 4.0, "map_threshold": 3.0})
    assert calibrated == HeatmapScale(0.0, 4.0, 3.0, None, "threshold") and not calibrated.per_image
    assert calibrated.normalize([-1.0, 0.0, 3.0, 9.0]).tolist() == [0.0, 0.0, 0.75, 1.0]


def test_the_colour_bar_marks_the_threshold_where_the_scale_puts_it():
    scale = HeatmapScale(low=0.0, high=4.0, threshold=3.0)
    bar = np.asarray(colorbar_image(scale, 240)).astype(int)
    column = bar[:, 10]  # inside the bar
    coloured = np.flatnonzero(np.abs(column - column[:, :1]).sum(axis=1) > 0)  # rows with colour (not gray)
    top, bottom = coloured.min(), coloured.max()
    black = np.flatnonzero((column.sum(axis=1) == 0) & (np.arange(len(column)) > top + 2) &
                           (np.arange(len(column)) < bottom - 2))
    assert black.size, "no threshold line across the bar"
    position = 1 - (black.mean() - top) / (bottom - top)
    assert position == pytest.approx(0.75, abs=0.03)
    # Blue at the bottom, dark red at the top: the same colours as the heatmaps.
    assert np.abs(column[bottom - 1] - jet_colors(np.zeros(1))[0]).max() <= 12
    assert np.abs(column[top + 1] - jet_colors(np.ones(1))[0]).max() <= 12
    # The heatmap enlarged, bar to the right, same height.
    combined = with_colorbar(Image.new("RGB", (8, 8)), scale)
    assert combined.height == 256 and combined.width > 256
