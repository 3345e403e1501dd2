"""Tiny saved models for script and pipeline tests (CPU, seconds)."""

import torch

from modeling_cyclegan import CycleGANConfig, CycleGANImageProcessor, CycleGANModel
from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.modeling_maf import MaskedLinear


def randomize_flow(model, seed=0, std=0.1, other_std=None):
    """Random weights and biases on a flow's MADE connections (absent ones kept at zero; a fresh flow is the identity,
    which would compare trivially), and, with `other_std`, on every other leaf module's trainable parameters (location
    embeddings, batch norms; not a frozen backbone's), drawn in module order from one seeded generator. Returns the
    model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedLinear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std * module.mask())
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * std)
            elif other_std is not None and not list(module.children()):
                for parameter in module.parameters(recurse=False):
                    if parameter.requires_grad:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * other_std)
    return model


FLOWS = {"maf": (MAFModel, MAFConfig), "iaf": (IAFModel, IAFConfig)}


def random_flow(kind, fields, seed=0):
    """A MAF or IAF (`kind`, a key of FLOWS) of config `fields` with random weights everywhere (`randomize_flow`,
    std 0.3), in eval mode."""
    model_class, config_class = FLOWS[kind]
    return randomize_flow(model_class(config_class(**fields)), seed=seed, std=0.3, other_std=0.3).eval()


def save_tiny_maf(path, num_channels=3, seed=0):
    """A 8x8 MAF (2 blocks of 16-16) with random weights on its connections, saved to `path`; returns the model."""
    model = MAFModel(MAFConfig(image_size=8, num_channels=num_channels, hidden_sizes=[16, 16], num_blocks=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedLinear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.05 * module.mask())
    model.save_pretrained(path)
    return model


def save_tiny_cyclegan(path, seed=0):
    """A 16x16 CycleGAN (4 filters, 1 residual block) with its image processor, saved to `path`."""
    torch.manual_seed(seed)
    config = CycleGANConfig(image_size=16, generator_filters=4, num_residual_blocks=1, discriminator_filters=4,
                            discriminator_layers=2)
    CycleGANModel(config).save_pretrained(path)
    CycleGANImageProcessor(size=16).save_pretrained(path)
    return path
