"""How a flow's rows map to images: every patch of a patch flow, or the whole image of a whole-image flow.

A patch flow (`MAFConfig.patch_size`) models log p(patch | location): every image is cut into all its P x P patches at
`patch_stride` (`torch.nn.functional.unfold`), one row of the flow per patch, with the patch's location (row-major
over the patch grid). Per-pixel values come back by averaging each pixel over the patches that contain it (`fold`).
Samples are mosaics: independent, non-overlapping patches on a patch_size grid.

A whole-image flow has one "patch", the image: its row is the flattened image, it has no locations, and every method
here is the identity (or a reshape). The model calls the same methods either way.

This file imports only torch: it travels with modeling_maf.py into Hub repos (`trust_remote_code=True`).
"""

import torch
import torch.nn.functional as F


class PatchLayout:
    """Patch extraction, locations, folding per-patch values back to pixels, and sample mosaics, for the image and
    patch sizes of a `MAFConfig` (no parameters; a no-op for whole-image flows)."""

    def __init__(self, config):
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        self.num_features = config.num_features
        self.is_patched = config.patch_size is not None
        self.patch_size = config.patch_size if self.is_patched else config.image_size
        self.patch_stride = config.patch_stride if self.is_patched else config.image_size
        self.grid_size = config.patch_grid_size
        self.num_locations = config.num_patch_locations

    # ------------------------------------------------------------------------------------------ images -> rows
    def cut(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) -> the flow's rows (B * L, D), channel-major like a flattened image, and their
        locations (B * L,), row-major over the patch grid. A whole-image flow: the images flattened, no locations."""
        if not self.is_patched:
            return pixel_values.flatten(1), None
        columns = F.unfold(pixel_values, self.patch_size, stride=self.patch_stride)  # (B, C*P*P, L)
        patches = columns.transpose(1, 2).reshape(-1, self.num_features)
        return patches, self.locations(pixel_values.shape[0], pixel_values.device)

    def locations(self, num_images: int, device) -> torch.Tensor | None:
        """The location of every patch of `num_images` images (num_images * L,); None for a whole-image flow."""
        if not self.is_patched:
            return None
        return torch.arange(self.num_locations, device=device).repeat(num_images)

    def per_image(self, rows: torch.Tensor, num_images: int) -> torch.Tensor:
        """Per-row values (B * L, ...) -> per image (B, L, ...); a whole-image flow's rows are its images."""
        return rows.view(num_images, self.num_locations, *rows.shape[1:]) if self.is_patched else rows

    def mean_per_image(self, rows: torch.Tensor, num_images: int) -> torch.Tensor:
        """Per-row values (B * L,) -> the mean over each image's patches (B,); a whole-image flow's rows are its
        images."""
        return rows.view(num_images, self.num_locations).mean(dim=1) if self.is_patched else rows

    # ------------------------------------------------------------------------------------------ rows -> pixels
    def fold_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-patch values (B, L, K * P * P), K maps of P x P each (channel-major, as `cut` makes them) -> per-pixel
        maps (B, K, H, W): each pixel the mean over the patches that contain it (a whole-image flow: a reshape)."""
        if not self.is_patched:
            return values.reshape(values.shape[0], -1, self.image_size, self.image_size)
        columns = values.transpose(1, 2)
        sizes = dict(output_size=(self.image_size, self.image_size), kernel_size=self.patch_size,
                     stride=self.patch_stride)
        counts = F.fold(torch.ones_like(columns[:1, : self.patch_size**2]), **sizes)
        return F.fold(columns, **sizes) / counts

    def nll_maps(self, per_dimension_nll: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension NLL of the rows (B * L, D) -> (per-pixel maps (B, H, W), the channels summed and each pixel
        averaged over the patches that contain it; per-patch NLL at its location (B, Lh, Lw)). A whole-image flow:
        its per-pixel map sums to the image's NLL, and its patch grid is (B, 1, 1), the image's NLL."""
        per_patch = per_dimension_nll.sum(dim=1).view(num_images, self.grid_size, self.grid_size)
        per_pixel = per_dimension_nll.view(num_images, -1, self.num_channels, self.patch_size**2).sum(dim=2)
        return self.fold_mean(per_pixel)[:, 0], per_patch

    def grid_to_pixels(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps at the patch grid (B, Lh, Lw) -> pixel maps (B, H, W): each pixel the mean over the patches that
        contain it (a whole-image flow's one value fills its map)."""
        if not self.is_patched:
            return maps.reshape(-1, 1, 1).expand(-1, self.image_size, self.image_size)
        values = maps.reshape(maps.shape[0], -1, 1).expand(-1, -1, self.patch_size**2)
        return self.fold_mean(values)[:, 0]

    # ------------------------------------------------------------------------------------------ latents
    def latent_rows(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents of images, (B, D) (whole-image flow) or (B, L, D) (patch flow, one row per location), checked ->
        the flow's rows (B * L, D) and their locations."""
        if self.is_patched:
            expected = (self.num_locations, self.num_features)
            if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
                raise ValueError(f"latents must have shape (batch, {expected[0]}, {expected[1]}) for this patch model "
                                 f"(one row per patch location), got {tuple(latents.shape)}.")
            return latents.flatten(0, 1), self.locations(latents.shape[0], latents.device)
        if latents.ndim != 2 or latents.shape[1] != self.num_features:
            raise ValueError(f"latents must have shape (batch, {self.num_features}), got {tuple(latents.shape)}.")
        return latents, None

    def assemble(self, patches: torch.Tensor, num_images: int) -> torch.Tensor:
        """Pixels of every row (B * L, C, P, P) -> images (B, C, H, W), overlapping patches averaged."""
        return self.fold_mean(patches.reshape(num_images, self.num_locations, -1))

    # ------------------------------------------------------------------------------------------ sample mosaics
    @property
    def rows_per_sample(self) -> int:
        """Rows of the flow in one sample: the mosaic's non-overlapping patches (1 for a whole-image flow)."""
        return (self.image_size // self.patch_size) ** 2

    def mosaic_locations(self, num_samples: int, device) -> torch.Tensor | None:
        """The patch locations of `num_samples` mosaics (num_samples * M,): the non-overlapping patches on a
        patch_size grid, row-major; None for a whole-image flow."""
        if not self.is_patched:
            return None
        size, patch, stride = self.image_size, self.patch_size, self.patch_stride
        if patch % stride or size % patch:
            raise ValueError(f"A patch model samples a mosaic of non-overlapping patches, which needs patch_size % "
                             f"patch_stride == 0 and image_size % patch_size == 0; this model has image_size {size}, "
                             f"patch_size {patch}, patch_stride {stride}.")
        grid = torch.arange(size // patch, device=device) * (patch // stride)
        per_image = (grid[:, None] * self.grid_size + grid[None, :]).flatten()
        return per_image.repeat(num_samples)

    def mosaic(self, patches: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Patches (num_samples * M, C, P, P) at `mosaic_locations` -> images (num_samples, C, H, W)."""
        if not self.is_patched:
            return patches
        per_side, patch = self.image_size // self.patch_size, self.patch_size
        tiles = patches.view(num_samples, per_side, per_side, self.num_channels, patch, patch)
        return tiles.permute(0, 3, 1, 4, 2, 5).reshape(num_samples, self.num_channels, self.image_size,
                                                       self.image_size)


__all__ = ["PatchLayout"]
