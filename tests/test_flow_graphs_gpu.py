"""modeling_maf.flow_graphs on CUDA: log_prob through a CUDA graph of the density direction equals the eager
log_prob (float32 and bf16 autocast, whole-image and patch flows, MAF and IAF), sees in-place weight updates, keeps
one graph per key and makes a new one when the block-sparse switch changes; sampling under autocast replays too;
out-of-range pixels still raise when the graph replays; a batch of temperatures gives each temperature's own rows;
a MAF's refinement steps replay a graph of their gradient and end where eager steps do.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -q tests/test_flow_graphs_gpu.py`.
"""

import pytest
import torch

from modeling_maf import flow_graphs, masked_matmul
from tiny_models import FLOWS, random_flow


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

WHOLE = dict(image_size=8, num_channels=3, hidden_sizes=[64, 48], num_blocks=3)
PATCH = dict(image_size=16, num_channels=2, hidden_sizes=[32, 32], num_blocks=2, patch_size=8, patch_stride=4)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("fields", [WHOLE, PATCH], ids=["whole", "patch"])
@pytest.mark.parametrize("kind", FLOWS)
def test_graphed_log_prob_matches_eager_log_prob(monkeypatch, kind, fields, autocast):
    model = random_flow(kind, fields).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    pixels = [torch.rand(5, fields["num_channels"], fields["image_size"], fields["image_size"], device="cuda",
                         generator=generator) for _ in range(2)]

    def log_prob(images):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model(images).log_prob

    # Eager (first call at this shape), captured and replayed, then replayed twice more.
    graphed = [log_prob(images) for images in (pixels[0], pixels[1], pixels[0], pixels[1])]
    assert flow_graphs.num_graphs(model, "density") == 1
    monkeypatch.setattr(model, "density_cuda_graphs", False)
    eager = [log_prob(images) for images in (pixels[0], pixels[1], pixels[0], pixels[1])]
    torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-4)
    assert not torch.equal(graphed[2], graphed[3])
    # The graph reads the weights where they live: an in-place update is seen by the next replay.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    eager = log_prob(pixels[0])
    monkeypatch.setattr(model, "density_cuda_graphs", True)
    torch.testing.assert_close(log_prob(pixels[0]), eager, rtol=1e-6, atol=1e-4)
    assert flow_graphs.num_graphs(model, "density") == 1


def test_training_mode_and_gradients_stay_eager():
    model = random_flow("maf", WHOLE).cuda()
    pixels = torch.rand(4, 3, 8, 8, device="cuda")
    for _ in range(3):
        model(pixels).loss.backward()  # eval mode, with gradients
        with torch.no_grad():
            model.train()(pixels)
            model.eval()
    assert flow_graphs.num_graphs(model, "density") == 0


def test_a_changed_kernel_switch_makes_a_new_graph(monkeypatch):
    model = random_flow("maf", WHOLE).cuda()
    pixels = torch.rand(4, 3, 8, 8, device="cuda")
    with torch.no_grad():
        first = [model(pixels).log_prob for _ in range(3)]
        monkeypatch.setenv(masked_matmul.DISABLE_ENV, "0")
        second = [model(pixels).log_prob for _ in range(3)]
    assert flow_graphs.num_graphs(model, "density") == 2
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-3)


def test_graphed_sampling_under_autocast_matches_eager_sampling(monkeypatch):
    model = random_flow("maf", WHOLE).cuda()

    def sample(seed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.sample(3, generator=torch.Generator("cuda").manual_seed(seed))

    graphed = [sample(seed) for seed in (1, 2, 1)]
    assert flow_graphs.num_graphs(model, "generation") == 1
    monkeypatch.setattr(model, "sampling_cuda_graphs", False)
    eager = [sample(seed) for seed in (1, 2, 1)]
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)


def test_out_of_range_pixels_raise_when_the_graph_replays():
    # On CUDA the [0, 1] check reads the values on the host after the work is launched (checked_pixel_values).
    model = random_flow("maf", WHOLE).cuda().eval()
    pixels = torch.rand(4, 3, 8, 8, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # eager, captured, replayed
            model(pixels)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            model(pixels * 2 - 1)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            model.encode(pixels * 255)
    assert flow_graphs.num_graphs(model, "density") == 1


@pytest.mark.parametrize("kind", FLOWS)
def test_a_batch_of_temperatures_is_each_temperatures_own_call_on_cuda(kind):
    """sample(temperature=[...]) on CUDA: the exact rows of one batch (through the graphs and the block-sparse kernel)
    are those of one call per temperature. (Refined rows are not compared: the preconditioned ascent moves a
    coordinate whose gradient is ~0 by the full step, its sign set by rounding, so batching's rounding is amplified.)"""
    model = random_flow(kind, WHOLE).cuda().eval()
    batch = model.sample(3, generator=torch.Generator("cuda").manual_seed(0), temperature=[1.0, 0.7])
    refined = model.sample(3, generator=torch.Generator("cuda").manual_seed(0), temperature=[1.0, 0.7],
                           refine_steps=5)
    assert refined.shape == batch.shape == (6, 3, 8, 8) and 0 <= float(refined.min()) <= float(refined.max()) <= 1
    for index, temperature in enumerate((1.0, 0.7)):
        alone = model.sample(3, generator=torch.Generator("cuda").manual_seed(0), temperature=temperature)
        torch.testing.assert_close(batch[3 * index: 3 * index + 3], alone, rtol=0, atol=1e-3)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("fields", [WHOLE, PATCH], ids=["whole", "patch"])
@pytest.mark.parametrize("kind", FLOWS)
def test_graphed_refinement_matches_eager_refinement(monkeypatch, kind, fields, autocast):
    """A MAF's refinement steps replay one CUDA graph of the gradient (its first step eager, the second captured) and
    end where eager steps end; an IAF's gradient changes with the temperature and stays eager."""
    model = random_flow(kind, fields).cuda().eval()

    def refine(seed):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model.sample(3, generator=torch.Generator("cuda").manual_seed(seed), refine_steps=6)

    graphed = [refine(seed) for seed in (1, 2)]
    assert flow_graphs.num_graphs(model, "refinement") == (0 if model.conditioner_on_noise else 1)
    monkeypatch.setattr(model, "density_cuda_graphs", False)
    eager = [refine(seed) for seed in (1, 2)]
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    assert not torch.equal(graphed[0], graphed[1])
