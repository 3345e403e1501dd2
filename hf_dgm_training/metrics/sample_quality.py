"""How generated images compare with the data: density under the model, roughness, diversity, and distance to the
nearest training image (a sample that is a copy of a training image is not a generated image).

Every measure is taken on the 8-bit images that are written to disk (`quantize`), and every data-relative measure
is a ratio to the same measure on the data, so the numbers read the same at any image size:

- bits/dim: -log2 p(x) / D under the model (bin-centre dequantisation, as for anomaly scores);
- roughness: mean |discrete Laplacian| of the image in 8-bit levels (4-neighbour stencil, inner pixels, every
  channel); static is rough, a photograph of a capsule is smooth. Ratio: to the training images';
- diversity: mean L2 distance between two samples of a set, over all pairs. Ratio: to that between training images;
- nearest training image: L2 distance from each sample to its nearest training image. Ratios: to the mean and the
  smallest nearest-training distance of the test-good images (held-out images of the data; a ratio below 1 means a
  sample sits closer to the training set than real unseen images do).

Plain torch; `load_reference_images` imports the data package (datasets) only when called.
"""

from typing import NamedTuple

import torch


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to the 8-bit grid they are saved on."""
    return (images.float().clamp(0, 1) * 255).round() / 255


def roughness(images: torch.Tensor) -> torch.Tensor:
    """Per image (N,): mean |4-neighbour Laplacian| over channels and inner pixels, in 8-bit levels."""
    x = images.float() * 255
    laplacian = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    return laplacian.abs().flatten(1).mean(dim=1)


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean L2 distance (pixel values in [0, 1]) over all pairs of images; needs at least two."""
    if len(images) < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 images, got {len(images)}.")
    return float(torch.pdist(images.double().flatten(1)).mean())


def nearest_distances(images: torch.Tensor, reference: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per image (N,): L2 distance (pixel values in [0, 1]) to the nearest image of `reference`."""
    flat_reference = reference.double().flatten(1)
    return torch.cat([torch.cdist(chunk.double().flatten(1), flat_reference).min(dim=1).values
                      for chunk in images.split(batch_size)])


@torch.no_grad()
def bits_per_dim(model, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Per image (N,): bits/dim under `model` (a MAFModel or IAFModel) in eval mode (bin-centre dequantisation)."""
    was_training = model.training
    model.eval()
    try:
        values = [model(chunk.to(model.device)).bits_per_dim for chunk in images.split(batch_size)]
        return torch.cat(values).double().cpu()
    finally:
        model.train(was_training)


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


class ReferenceImages(NamedTuple):
    train: torch.Tensor  # (N, C, H, W) in [0, 1]: the training images
    test_good: torch.Tensor  # (M, C, H, W) in [0, 1]: held-out normal images


def load_reference_images(image_processor, data_dir=None, dataset_name=None, category="capsule", token=None,
                          cache_dir=None) -> ReferenceImages:
    """Training images (train/good) and test-good images of an anomaly data set (`load_anomaly_dataset`: a local
    folder or a Hub id), through `image_processor` (the model's `MAFImageProcessor`, as in training), in [0, 1]."""
    from ..data.anomaly import GOOD, AnomalyDataError, load_anomaly_dataset, load_split_as_tensors

    dataset = load_anomaly_dataset(data_dir, dataset_name, category=category, token=token, cache_dir=cache_dir)
    train = load_split_as_tensors(dataset["train"], image_processor=image_processor).pixel_values
    test = load_split_as_tensors(dataset["test"], image_processor=image_processor)
    good = torch.tensor([defect == GOOD for defect in test.defect_types])
    if len(train) < 2 or not bool(good.any()):
        raise AnomalyDataError(f"Sample measures need at least 2 training images and 1 test/good image; got "
                               f"{len(train)} and {int(good.sum())} from {data_dir or dataset_name}.")
    return ReferenceImages(train=train, test_good=test.pixel_values[good])


def reference_statistics(model, reference: ReferenceImages, batch_size: int = 16) -> dict:
    """The data's own measures, against which samples are compared (`sample_quality`)."""
    if reference.train.shape[1:] != (model.config.num_channels, model.config.image_size, model.config.image_size):
        raise ValueError(f"Reference images have shape {tuple(reference.train.shape[1:])} but the model generates "
                         f"{(model.config.num_channels, model.config.image_size, model.config.image_size)}.")
    return {
        "num_train_images": len(reference.train),
        "num_test_good_images": len(reference.test_good),
        "train_roughness": float(roughness(reference.train).mean()),
        "train_mean_pairwise_distance": mean_pairwise_distance(reference.train),
        "test_good_bits_per_dim": _summary(bits_per_dim(model, reference.test_good, batch_size)),
        "test_good_nearest_train_distance": _summary(nearest_distances(reference.test_good, reference.train)),
    }


def sample_quality(model, images: torch.Tensor, reference: ReferenceImages | None = None,
                   statistics: dict | None = None, batch_size: int = 16) -> dict:
    """Measures of generated `images` (N, C, H, W) in [0, 1], taken on their 8-bit version.

    Without `reference` (and its `statistics` from `reference_statistics`) only the model-relative measures are
    returned: bits/dim, roughness, and diversity (when N >= 2).
    """
    images = quantize(images.detach().cpu())
    sample_bits = bits_per_dim(model, images, batch_size)
    rough = roughness(images)
    measures = {"bits_per_dim": _summary(sample_bits), "bits_per_dim_per_sample": sample_bits.tolist(),
                "roughness": float(rough.mean())}
    if len(images) >= 2:
        measures["mean_pairwise_distance"] = mean_pairwise_distance(images)
    if reference is None:
        return measures
    if statistics is None:
        raise ValueError("sample_quality: pass the reference's `statistics` (from reference_statistics) too.")
    nearest = nearest_distances(images, reference.train)
    test_good = statistics["test_good_nearest_train_distance"]
    measures.update({
        "roughness_vs_train": measures["roughness"] / statistics["train_roughness"],
        "nearest_train_distance": _summary(nearest),
        "nearest_train_distance_vs_test_good": float(nearest.double().mean()) / test_good["mean"],
        "min_nearest_train_distance_vs_test_good_min": float(nearest.min()) / test_good["min"],
    })
    if "mean_pairwise_distance" in measures:
        measures["diversity_vs_train"] = measures["mean_pairwise_distance"] / statistics["train_mean_pairwise_distance"]
    return measures
