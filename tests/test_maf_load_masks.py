"""The MADE masks belong to the model: a checkpoint whose masked entries are not zero (another library, merged or
edited weights) loads as an autoregressive model through every load path, with a warning that counts the entries.

Paths: `load_state_dict` (also through a wrapper), `save_pretrained` -> `from_pretrained` (also through
`AutoModel`), the loopback Hub (`push_to_hub` -> `from_pretrained(repo_id)`), and accelerate's `load_state` on
resume. After each: the weights equal the unperturbed ones, `decode(encode(x))` gives x back, and the Jacobian of
every block is exactly triangular in its ordering (so `log_prob` is a normalised density).
"""

import math

import pytest
import torch
from transformers import AutoModel

from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.modeling_maf import MaskedLinear
from tiny_models import randomize_flow


FLOWS = [(MAFModel, MAFConfig), (IAFModel, IAFConfig)]


def tiny_flow(model_class=MAFModel, config_class=MAFConfig, seed=0):
    config = config_class(image_size=3, num_channels=1, hidden_sizes=[8, 6], num_blocks=2, degree_assignment="random")
    return randomize_flow(model_class(config), seed, std=0.3).eval()


def perturbed_state_dict(model, seed=1):
    """The model's state dict with noise on every absent connection; returns it and how many entries changed."""
    generator = torch.Generator().manual_seed(seed)
    state, count = {}, 0
    masks = {f"{name}.weight": module.mask() for name, module in model.named_modules()
             if isinstance(module, MaskedLinear)}
    for name, tensor in model.state_dict().items():
        tensor = tensor.clone()
        if name in masks:
            noise = torch.randn(tensor.shape, generator=generator) * 0.5
            tensor = torch.where(masks[name], tensor, noise)
            count += int((~masks[name]).sum())
        state[name] = tensor
    return state, count


def perturb_in_place(model, seed=1):
    """Writes the perturbed weights into the model without any load path (what editing the tensors does)."""
    state, count = perturbed_state_dict(model, seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(state[name])
    return count


def assert_autoregressive(model, reference):
    """Same weights as the unperturbed reference; exact inverse; triangular Jacobian in every block's ordering."""
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    pixels = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.decode(model.encode(pixels)), pixels, rtol=0, atol=1e-5)
    model = model.double()
    for block in model.blocks:
        inputs = torch.randn(1, model.config.num_features, dtype=torch.float64)
        degrees = block.input_degrees
        for index in range(2):  # shift, log-scale
            jacobian = torch.autograd.functional.jacobian(lambda v: block(v)[index][0], inputs)[:, 0, :]
            assert torch.all(jacobian[degrees[None, :] >= degrees[:, None]] == 0)


@torch.no_grad()
def off_by(model, pixels):
    return float((model.decode(model.encode(pixels)) - pixels).abs().max())


def test_perturbed_weights_break_the_flow_unless_a_load_path_restores_the_masks():
    """The control: with the masked entries non-zero the model is no longer invertible by the segment inverse."""
    model = tiny_flow()
    pixels = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    assert off_by(model, pixels) < 1e-5
    perturb_in_place(model)
    assert off_by(model, pixels) > 1e-3
    with pytest.warns(UserWarning, match="nonzero weight"):
        model.zero_absent_connections()
    assert off_by(model, pixels) < 1e-5


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_load_state_dict_zeroes_masked_entries_with_a_counted_warning(model_class, config_class):
    reference = tiny_flow(model_class, config_class)
    state, count = perturbed_state_dict(reference)
    model = model_class(reference.config).eval()
    with pytest.warns(UserWarning, match=rf"had {count} nonzero weight\(s\)"):
        model.load_state_dict(state)
    assert_autoregressive(model, reference)

    # Through a wrapper module (as DDP and accelerate hold the model): the post-hook of the inner model still runs.
    wrapper = torch.nn.ModuleDict({"module": model_class(reference.config).eval()})
    with pytest.warns(UserWarning, match=rf"had {count} nonzero"):
        wrapper.load_state_dict({f"module.{name}": tensor for name, tensor in state.items()})
    assert_autoregressive(wrapper["module"], reference)


def test_a_clean_checkpoint_loads_without_a_warning(tmp_path, recwarn):
    reference = tiny_flow()
    model = MAFModel(reference.config)
    model.load_state_dict(reference.state_dict())
    reference.save_pretrained(tmp_path)
    MAFModel.from_pretrained(tmp_path)
    assert not [w for w in recwarn if "nonzero weight" in str(w.message)]


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_save_pretrained_then_from_pretrained_restores_the_masks(tmp_path, model_class, config_class):
    reference = tiny_flow(model_class, config_class)
    perturbed = tiny_flow(model_class, config_class)
    count = perturb_in_place(perturbed)
    perturbed.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=rf"{tmp_path} had {count} nonzero"):
        loaded = model_class.from_pretrained(tmp_path)
    assert_autoregressive(loaded, reference)
    with pytest.warns(UserWarning, match=rf"had {count} nonzero"):
        auto, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(auto) is model_class and not info["missing_keys"]
    assert_autoregressive(auto, reference)


def test_from_pretrained_by_hub_id_restores_the_masks(hub_server, tmp_path):
    reference = tiny_flow()
    perturbed = tiny_flow()
    count = perturb_in_place(perturbed)
    repo_id = hub_server.repo_id("maf-perturbed")
    perturbed.push_to_hub(repo_id)
    with pytest.warns(UserWarning, match=rf"{repo_id} had {count} nonzero"):
        loaded = MAFModel.from_pretrained(repo_id, cache_dir=tmp_path)
    assert_autoregressive(loaded, reference)


def test_accelerate_load_state_on_resume_restores_the_masks(tmp_path):
    from accelerate import Accelerator

    reference = tiny_flow()
    perturbed = tiny_flow()
    count = perturb_in_place(perturbed)
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(perturbed)
    accelerator.save_state(str(tmp_path / "checkpoint"))

    restarted = Accelerator(cpu=True)  # a new run: a fresh model, resumed from the checkpoint
    resumed = restarted.prepare(MAFModel(reference.config).eval())
    with pytest.warns(UserWarning, match=rf"had {count} nonzero"):
        restarted.load_state(str(tmp_path / "checkpoint"))
    assert_autoregressive(restarted.unwrap_model(resumed), reference)


def test_log_prob_of_a_restored_model_is_a_normalised_density():
    """Two dimensions, integrated on a grid: mass 1 after loading a perturbed checkpoint."""
    config = MAFConfig(image_size=1, num_channels=2, hidden_sizes=[8, 8], num_blocks=3)
    reference = MAFModel(config).double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, MaskedLinear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
                                    * 0.4 * module.mask())
    state, count = perturbed_state_dict(reference)
    model = MAFModel(config).double().eval()
    with pytest.warns(UserWarning, match=rf"had {count} nonzero"):
        model.load_state_dict(state)
    axis = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        latents, log_det = model._flow_density(grid)
    log_density = (-0.5 * latents.square() - 0.5 * math.log(2 * math.pi) + log_det).sum(1)
    mass = float(log_density.exp().sum() * (axis[1] - axis[0]) ** 2)
    assert abs(mass - 1.0) < 1e-3
