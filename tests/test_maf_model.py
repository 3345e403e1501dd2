"""modeling_maf: masks, log-determinants, exact inverses, serialisation, precision and input checks (CPU, tiny)."""

import math
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel

from modeling_maf import IAFConfig, IAFModel, MAFConfig, MAFModel
from modeling_maf.configuration_maf import DEGREE_ASSIGNMENTS
from modeling_maf.modeling_maf import DEGREE_RULES, MaskedLinear, hidden_degrees


FLOWS = [(MAFModel, MAFConfig), (IAFModel, IAFConfig)]


def tiny_config(config_class=MAFConfig, **overrides):
    fields = dict(image_size=3, num_channels=2, hidden_sizes=[12, 10], num_blocks=3)
    fields.update(overrides)
    return config_class(**fields)


def randomize(model, std=0.3, seed=0):
    """Random weights that respect the masks (a fresh model's output layer is zero, which would make every
    dependence test pass trivially)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskedLinear):
                weight = torch.randn(module.weight.shape, generator=generator, dtype=module.weight.dtype) * std
                module.weight.copy_(weight * module.mask())
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator, dtype=module.bias.dtype) * std)
    return model


def naive_sequential_inverse(block, known, solve_segment):
    """Reference inverse, one MADE evaluation per dimension (what nflows, zuko and normflows do)."""
    solved = torch.zeros_like(known)
    for position in torch.argsort(block.input_degrees).tolist():
        shift, log_scale = block(solved)
        solved[:, position] = solve_segment(known[:, position], shift[:, position], log_scale[:, position])
    return solved


@pytest.mark.parametrize("assignment", DEGREE_ASSIGNMENTS)
def test_made_outputs_depend_only_on_earlier_dimensions(assignment):
    model = randomize(MAFModel(tiny_config(degree_assignment=assignment, permutation="random")).double())
    num_features = model.config.num_features
    for block in model.blocks:
        degrees = block.input_degrees
        inputs = torch.randn(1, num_features, dtype=torch.float64)
        for output_index in range(2):  # shift, then log-scale
            jacobian = torch.autograd.functional.jacobian(lambda v: block(v)[output_index][0], inputs)[:, 0, :]
            # d(output at position i)/d(input at position j) must vanish unless degree(j) < degree(i).
            forbidden = degrees[None, :] >= degrees[:, None]
            assert torch.all(jacobian[forbidden] == 0)
            # ...and the allowed part must actually be used (masks are not over-restrictive everywhere).
            assert jacobian[~forbidden].abs().sum() > 0


def test_spread_degrees_cover_the_whole_input_range():
    config = tiny_config(image_size=8, num_channels=3, hidden_sizes=[16, 16])  # D = 192 >> H = 16
    model = MAFModel(config)
    for layer in model.blocks[0].made.layers[:-1]:
        assert int(layer.out_degrees.min()) == 1 and int(layer.out_degrees.max()) == config.num_features - 1
    # The modulo rule of nflows, by contrast, only reaches the first H degrees.
    sequential = MAFModel(tiny_config(image_size=8, num_channels=3, hidden_sizes=[16, 16],
                                      degree_assignment="sequential"))
    assert int(sequential.blocks[0].made.layers[0].out_degrees.max()) == 16


def test_degree_rules_are_the_configs_names_and_give_the_same_degrees_as_always():
    assert tuple(DEGREE_RULES) == DEGREE_ASSIGNMENTS
    # Pinned values: checkpoints store no masks, so a rule must keep giving the degrees it gave when they were saved.
    generator = torch.Generator().manual_seed(0)
    assert hidden_degrees("spread", 10, 4, 1, generator).tolist() == [1, 4, 6, 9]
    assert hidden_degrees("spread", 10, 3, 4, generator).tolist() == [4, 6, 9]
    assert hidden_degrees("sequential", 5, 6, 1, generator).tolist() == [1, 2, 3, 4, 1, 2]
    drawn = hidden_degrees("random", 10, 5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, torch.randint(3, 10, (5,), generator=torch.Generator().manual_seed(0)))


def test_degree_rule_contract_is_enforced_in_one_place(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setitem(DEGREE_RULES, "below", lambda features, width, lowest, g: torch.full((width,), lowest - 1))
    monkeypatch.setitem(DEGREE_RULES, "too_high", lambda features, width, lowest, g: torch.full((width,), features))
    monkeypatch.setitem(DEGREE_RULES, "short",
                        lambda features, width, lowest, g: torch.ones(width - 1, dtype=torch.long))
    monkeypatch.setitem(DEGREE_RULES, "top", lambda features, width, lowest, g: torch.full((width,), features - 1))
    with pytest.raises(ValueError, match=r"'below'.*must lie in \[2, 9\]"):
        hidden_degrees("below", 10, 4, 2, generator)
    with pytest.raises(ValueError, match=r"'too_high'.*must lie in"):
        hidden_degrees("too_high", 10, 4, 1, generator)
    with pytest.raises(ValueError, match="'short' returned"):
        hidden_degrees("short", 10, 4, 1, generator)
    with pytest.raises(ValueError, match="registered rules"):
        hidden_degrees("modulo", 10, 4, 1, generator)
    assert hidden_degrees("top", 10, 4, 1, generator).tolist() == [9] * 4  # a new rule is one function


@pytest.mark.parametrize("model_class,config_class", FLOWS)
@pytest.mark.parametrize("normalization", ["none", "batch_norm"])
def test_log_prob_equals_change_of_variables_with_autograd_jacobian(model_class, config_class, normalization):
    config = tiny_config(config_class, image_size=2, normalization=normalization)  # D = 8
    model = randomize(model_class(config).double())
    if normalization == "batch_norm":  # give the running statistics non-trivial values
        model.train()
        model(torch.rand(6, 2, 2, 2, dtype=torch.float64))
    model.eval()
    pixels = torch.rand(2, 2, 2, 2, dtype=torch.float64)
    log_prob = model(pixels).log_prob
    for index in range(2):
        # Eval dequantisation puts the point at x_256 = 255 * pixel + 0.5, so dz/dx_256 = dz/dpixel / 255.
        jacobian = torch.autograd.functional.jacobian(lambda p: model.encode(p.view(1, 2, 2, 2))[0],
                                                      pixels[index].flatten())
        latents = model.encode(pixels[index : index + 1])[0]
        expected = (
            -0.5 * latents.square().sum() - 0.5 * 8 * math.log(2 * math.pi)
            + torch.linalg.slogdet(jacobian / 255).logabsdet
        )
        torch.testing.assert_close(log_prob[index], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("model_class,config_class", FLOWS)
@pytest.mark.parametrize("assignment", DEGREE_ASSIGNMENTS)
def test_decode_inverts_encode(model_class, config_class, assignment):
    model = randomize(model_class(tiny_config(config_class, degree_assignment=assignment)), std=0.2).eval()
    pixels = torch.rand(4, 2, 3, 3)
    restored = model.decode(model.encode(pixels))
    torch.testing.assert_close(restored, pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("assignment", DEGREE_ASSIGNMENTS)
@pytest.mark.parametrize("permutation", ["reverse", "random"])
def test_segment_inverse_equals_naive_inverse(assignment, permutation):
    config = tiny_config(image_size=4, hidden_sizes=[9, 7], degree_assignment=assignment, permutation=permutation)
    model = randomize(MAFModel(config).double(), seed=3)
    known = torch.randn(3, config.num_features, dtype=torch.float64)

    def generate(z, shift, a):  # MAF sampling
        return z * torch.exp(a) + shift

    def density(x, shift, a):  # IAF density
        return (x - shift) * torch.exp(-a)

    for block in model.blocks:
        last_degrees = block.made.layers[-1].in_degrees
        assert block.num_sequential_passes == len(torch.unique(last_degrees)) + 1 <= 7 + 1
        for solve in (generate, density):
            fast, _ = block.solve_sequential(known, solve)
            torch.testing.assert_close(fast, naive_sequential_inverse(block, known, solve), rtol=1e-12, atol=1e-12)


def test_spec_config_needs_at_most_hidden_plus_one_passes_and_has_the_spec_size():
    config = MAFConfig()
    assert (config.image_size, config.num_channels, config.hidden_sizes, config.num_blocks) == (128, 3, [512, 512], 7)
    with torch.device("meta"):
        model = MAFModel(config)
    first, middle, last = model.blocks[0].made.layers
    assert (first.in_features, first.out_features) == (49152, 512)
    assert (middle.in_features, middle.out_features) == (512, 512)
    assert (last.in_features, last.out_features) == (512, 2 * 49152)
    assert model.num_parameters() == 7 * (49152 * 512 + 512 + 512 * 512 + 512 + 512 * 2 * 49152 + 2 * 49152)
    assert model.num_parameters() == 531_012_608
    assert model.num_sequential_passes() == [513] * 7


def test_flow_density_integrates_to_one_in_two_dimensions():
    model = randomize(MAFModel(MAFConfig(image_size=1, num_channels=2, hidden_sizes=[8, 8], num_blocks=3)).double(),
                      std=0.4).eval()
    axis = torch.linspace(-12, 12, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    latents, log_det = model._flow_density(grid)
    log_density = (-0.5 * latents.square() - 0.5 * math.log(2 * math.pi) + log_det).sum(1)
    mass = log_density.exp().sum() * (axis[1] - axis[0]) ** 2
    assert abs(float(mass.detach()) - 1.0) < 1e-3


def test_pixel_density_of_identity_flow_has_the_mass_of_the_logit_box():
    """A fresh flow is the identity: p over [0,256)^2 integrates to the base mass inside logit([a, 1-a])."""
    model = MAFModel(MAFConfig(image_size=1, num_channels=2, hidden_sizes=[4], num_blocks=2)).double().eval()
    bins = 256
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins  # midpoint rule on the unit grid
    pixels = torch.cartesian_prod(centres, centres)
    pixels = (pixels * bins - 0.5) / (bins - 1)  # so that eval dequantisation lands exactly on the midpoints
    log_prob = model(pixels.view(-1, 2, 1, 1)).log_prob
    mass = float(log_prob.detach().exp().sum())  # each cell of [0,256)^2 has volume 1
    edge = math.log(0.95 / 0.05)
    box = math.erf(edge / math.sqrt(2)) ** 2
    assert abs(mass - box) < 1e-3


def test_training_mode_dequantises_with_noise_and_eval_is_deterministic():
    model = MAFModel(tiny_config())
    pixels = torch.rand(2, 2, 3, 3)
    model.train()
    assert not torch.equal(model(pixels).log_prob, model(pixels).log_prob)
    model.eval()
    assert torch.equal(model(pixels).log_prob, model(pixels).log_prob)
    scores = model.anomaly_scores(pixels)
    model.train()
    assert torch.equal(model.anomaly_scores(pixels), scores) and model.training


def test_bits_per_dim_and_loss_are_consistent():
    model = randomize(MAFModel(tiny_config())).eval()
    out = model(torch.rand(3, 2, 3, 3))
    torch.testing.assert_close(out.bits_per_dim, -out.log_prob / (18 * math.log(2)))
    torch.testing.assert_close(out.loss, -out.log_prob.mean())
    assert out.latents.shape == (3, 18)


def test_anomaly_maps_sum_to_the_anomaly_scores():
    model = randomize(MAFModel(tiny_config())).eval()
    pixels = torch.rand(3, 2, 3, 3)
    maps = model.anomaly_maps(pixels)
    assert maps.shape == (3, 3, 3)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), model.anomaly_scores(pixels), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(model.anomaly_scores(pixels), -model(pixels).log_prob)


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_sample_shape_range_reproducibility_and_temperature(model_class, config_class):
    model = randomize(model_class(tiny_config(config_class)), std=0.2)
    first = model.sample(5, generator=torch.Generator().manual_seed(0), show_progress=True)
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    colder = model.sample(5, generator=torch.Generator().manual_seed(0), temperature=0.5)
    assert first.shape == (5, 2, 3, 3) and float(first.min()) >= 0 and float(first.max()) <= 1
    assert torch.equal(first, again) and not torch.equal(first, colder)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(2, temperature=0)


def test_masked_weights_stay_zero_through_training():
    model = MAFModel(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.rand(4, 2, 3, 3)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in model.modules():
        if isinstance(module, MaskedLinear):
            assert torch.all(module.weight[~module.mask()] == 0)
            assert module.weight[module.mask()].abs().sum() > 0


@pytest.mark.parametrize("chunk_entries", [1 << 24, 7])
def test_initialisation_is_the_masked_uniform_of_each_units_fan_in_and_caches_no_mask(monkeypatch, chunk_entries):
    """Hidden weights: uniform(-1, 1) / sqrt(connections of the unit), times the mask, bit for bit (signed zeros
    included) whether the rows go in one chunk or many; output layers zero; no whole-layer mask is left behind."""
    monkeypatch.setattr(MaskedLinear, "chunk_entries", chunk_entries)
    torch.manual_seed(0)
    model = MAFModel(tiny_config(degree_assignment="random", permutation="random"))
    layers = [module for module in model.modules() if isinstance(module, MaskedLinear)]
    assert all(layer._masks == {} for layer in layers)  # building the model caches no mask
    for layer in layers:
        mask = layer.mask()
        assert torch.equal(layer.fan_in(), mask.sum(dim=1))
        if layer.strict:
            assert torch.count_nonzero(layer.weight) == 0
            continue
        state = torch.get_rng_state()
        layer.reset_masked_uniform_()
        torch.set_rng_state(state)
        fan_in = mask.sum(dim=1, keepdim=True).clamp(min=1).float()
        expected = torch.empty_like(layer.weight).uniform_(-1.0, 1.0).mul_(fan_in.rsqrt()).mul_(mask)
        assert torch.equal(layer.weight.detach().view(torch.int32), expected.view(torch.int32))
        assert (layer.weight[~mask].view(torch.int32) != 0).any()  # negative zeros: the sign bits were compared


@pytest.mark.parametrize("model_class,config_class", FLOWS)
def test_save_load_round_trip_auto_classes_and_checkpoint_size(tmp_path, model_class, config_class):
    config = tiny_config(config_class, degree_assignment="random", permutation="random", normalization="batch_norm")
    model = randomize(model_class(config)).eval()
    pixels = torch.rand(3, 2, 3, 3)
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()
    assert type(auto) is model_class and AutoConfig.from_pretrained(tmp_path).model_type == config.model_type
    for other in (loaded, auto):
        assert torch.equal(other(pixels).log_prob, model(pixels).log_prob)
        for mine, theirs in zip(model.modules(), other.modules()):
            if isinstance(mine, MaskedLinear):  # masks rebuilt exactly after the meta-device load
                assert torch.equal(mine.mask(), theirs.mask())
    # Only weights, biases and batch-norm statistics are stored: no mask, so about 4 bytes per parameter.
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as checkpoint:
        dtypes = {checkpoint.get_slice(key).get_dtype() for key in checkpoint.keys()}
        assert not any("mask" in key for key in checkpoint.keys())
    assert dtypes == {"F32"}
    size = os.path.getsize(os.path.join(tmp_path, "model.safetensors"))
    stored = model.num_parameters() + 2 * config.num_blocks * config.num_features  # + running mean/var
    assert stored * 4 <= size <= stored * 4 + 16_384
    # register_for_auto_class: the repo carries its code for trust_remote_code loading.
    saved = set(os.listdir(tmp_path))
    assert {"modeling_maf.py", "configuration_maf.py"} <= saved
    import json

    auto_map = json.load(open(os.path.join(tmp_path, "config.json")))["auto_map"]
    assert auto_map["AutoModel"].endswith(model_class.__name__)


def test_bf16_autocast_nll_matches_float32():
    model = randomize(MAFModel(tiny_config(image_size=6, hidden_sizes=[32, 32])), std=0.05).eval()
    pixels = torch.rand(4, 2, 6, 6)
    with torch.no_grad():
        reference = model(pixels).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(pixels)
    assert mixed.log_prob.dtype == torch.float32
    assert abs(float(mixed.loss) - float(reference)) / abs(float(reference)) < 1e-3


@pytest.mark.parametrize(
    "pixels,error,match",
    [
        (torch.rand(2, 3, 3, 3), ValueError, "shape"),  # wrong channel count
        (torch.rand(2, 2, 4, 4), ValueError, "shape"),  # wrong size
        (torch.rand(2, 18), ValueError, "shape"),  # flattened
        (torch.rand(2, 2, 3, 3) * 255, ValueError, r"\[0, 1\]"),  # 0..255 floats
        (torch.rand(2, 2, 3, 3) * 2 - 1, ValueError, r"\[0, 1\]"),  # normalised to [-1, 1]
        (torch.randint(0, 255, (2, 2, 3, 3), dtype=torch.uint8), TypeError, "255"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_gives_a_clear_error(pixels, error, match):
    model = MAFModel(tiny_config())
    with pytest.raises(error, match=match):
        model(pixels)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(degree_assignment="modulo"), "degree_assignment"),
        (dict(permutation="shuffle"), "permutation"),
        (dict(normalization="layer_norm"), "normalization"),
        (dict(hidden_sizes=[]), "hidden_sizes"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(logit_alpha=0.5), "logit_alpha"),
        (dict(log_scale_clamp=0), "log_scale_clamp"),
        (dict(hidden_act="nope"), "hidden_act"),
    ],
)
def test_invalid_config_values_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        MAFConfig(**fields)
    with pytest.raises(ValueError, match=match):
        IAFConfig(**fields)
