"""scripts/train_cyclegan.py on tiny synthetic unpaired folders: outputs, exact resume, data errors, fast vs plain.

The runs go through the real script in a subprocess (as a user runs it); the step and data helpers are also
checked in-process.
"""

import copy
import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dgm_training.cyclegan import ImagePool
from hf_dgm_training.data.unpaired import UnpairedSampler, default_load_size, load_unpaired_split
from modeling_cyclegan import LOSS_NAMES, CycleGANConfig, CycleGANImageProcessor, CycleGANModel
from script_runner import run_in_process


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_cyclegan.py")
TINY = [
    "--image_size", "32", "--num_residual_blocks", "1", "--generator_filters", "8", "--discriminator_filters", "8",
    "--pool_size", "3", "--logging_steps", "4", "--num_grid_images", "2", "--num_train_epochs", "2",
]


def make_unpaired_folder(root, counts=(("trainA", 6), ("trainB", 5), ("testA", 2), ("testB", 3)), size=32):
    """CycleGAN layout with bright A images and dark B images; one grayscale and one RGBA image in trainB."""
    rng = np.random.default_rng(0)
    for folder, count in counts:
        os.makedirs(root / folder, exist_ok=True)
        base = 190 if folder.endswith("A") else 60
        for index in range(count):
            pixels = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if folder == "trainB" and index == 0:
                image = image.convert("L")
            if folder == "trainB" and index == 1:
                image = image.convert("RGBA")
            image.save(root / folder / f"{index}.png")
    return root


def run_script(*args, cwd=ROOT):
    return run_in_process("train_cyclegan.py", *args, cwd=cwd or ROOT, expect_ok=False)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_unpaired_folder(tmp_path_factory.mktemp("unpaired"))


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "full"
    result = run_script("--data_dir", data_dir, "--output_dir", output_dir, *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def test_run_writes_losses_plots_grids_checkpoints_and_model(full_run):
    lines = read_jsonl(full_run / "metrics.jsonl")
    records = [r for r in lines if "G_A" in r]  # one line per step, and one per epoch with the epoch's means
    assert [r["step"] for r in records] == list(range(1, 13))  # max(6, 5) steps per epoch, 2 epochs
    epoch_rows = [r for r in lines if "epoch/G_A" in r]
    assert [(r["step"], r["epoch"]) for r in epoch_rows] == [(6, 1), (12, 2)]
    assert epoch_rows[1]["epoch/cycle_A"] == pytest.approx(np.mean([r["cycle_A"] for r in records[6:]]))
    assert all(np.isfinite(r[name]) for r in records for name in LOSS_NAMES)
    assert {r["epoch"] for r in records} == {1, 2}
    # constant learning rate for the first half, then the reference's linear decay: 2e-4 * (1 - 1/2)
    assert {r["lr"] for r in records if r["epoch"] == 1} == {2e-4}
    assert {r["lr"] for r in records if r["epoch"] == 2} == {1e-4}

    plots = {"G_A", "G_B", "D_A", "D_B", "cycle", "identity", "all"}
    assert {f"loss_{name}.png" for name in plots} <= set(os.listdir(full_run / "plots"))
    assert sorted(os.listdir(full_run / "grids")) == ["epoch_001.png", "epoch_002.png"]
    with Image.open(full_run / "grids" / "epoch_002.png") as grid:  # 2 rows of 6 images of 32 px, padding 2
        assert grid.size == (6 * 34 + 2, 2 * 34 + 2)
        assert grid.mode == "P" and len(grid.getpalette()) <= 3 * 256  # a small palette PNG by default
    with Image.open(full_run / "preview.png") as preview:  # 8 training images per domain at the crop size
        assert preview.size == (8 * 34 + 2, 2 * 34 + 2) and preview.mode == "P"
    assert sorted(os.listdir(full_run / "checkpoints")) == ["step_12", "step_6"]

    results = json.loads((full_run / "train_results.json").read_text())
    assert results["completed"] and results["global_step"] == 12 and results["steps_per_epoch"] == 6
    assert results["grids"] == {"first": "grids/epoch_001.png", "middle": "grids/epoch_001.png",
                                "last": "grids/epoch_002.png"}
    assert results["steps_per_second"] > 0 and results["images_per_second"] > 0 and results["train_seconds"] > 0
    assert len(results["epoch_seconds"]) == 2
    assert results["final_epoch_mean_losses"]["D_A"] == epoch_rows[1]["epoch/D_A"]
    assert results["train_images"] == {"A": 6, "B": 5} and results["load_size"] == default_load_size(32) == 36
    assert set(results["evaluation"]) == {"cycle_l1_A", "cycle_l1_B"} and results["evaluation_split"] == "test"
    assert results["fast_path"]["batch_passes"] is True  # the default fast path (what applies on a CPU)

    model = CycleGANModel.from_pretrained(full_run)
    assert model.config.num_residual_blocks == 1 and model.config.pool_size == 3 and model.has_discriminators
    assert CycleGANImageProcessor.from_pretrained(full_run).size == {"height": 32, "width": 32}
    card = (full_run / "README.md").read_text()
    assert "lambda_identity" in card and "plots/loss_all.png" in card and "grids/epoch_002.png" in card


def train_in_process(*args):
    from train_cyclegan import main

    main([str(arg) for arg in args])


def test_resume_after_interruption_continues_exactly(data_dir, full_run, tmp_path, caplog):
    output_dir = tmp_path / "interrupted"
    train_in_process("--data_dir", data_dir, "--output_dir", output_dir, *TINY, "--max_train_steps", "8")
    state = json.loads((output_dir / "checkpoints" / "step_8" / "training_state.json").read_text())
    assert state["step"] == 8 and state["epoch"] == 1 and state["extra"]["step_in_epoch"] == 2
    results = json.loads((output_dir / "train_results.json").read_text())
    assert not results["completed"] and results["stopped_early"] and results["global_step"] == 8

    with caplog.at_level(logging.INFO, logger="hf_dgm_training.trainer"):
        train_in_process("--data_dir", data_dir, "--output_dir", output_dir, *TINY,
                         "--resume_from_checkpoint", "latest")
    assert "Resumed at step 8 (epoch 2, step 2 of it)" in caplog.text
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["completed"] and results["global_step"] == 12 and results["steps_this_run"] == 4

    # Same losses at every step and the same final weights as the uninterrupted run: data order, augmentation,
    # image pools, optimizers and learning rate all continued where they stopped.
    assert read_jsonl(output_dir / "metrics.jsonl") == read_jsonl(full_run / "metrics.jsonl")
    resumed, uninterrupted = CycleGANModel.from_pretrained(output_dir), CycleGANModel.from_pretrained(full_run)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_translate_script_works_on_the_training_output(full_run, data_dir, tmp_path):
    from translate import main as translate

    results = translate(["--model_name_or_path", str(full_run), "--input", str(data_dir / "testB"),
                         "--direction", "b_to_a", "--output_dir", str(tmp_path / "out"), "--save_grids"])
    assert results["images"] == 3
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.endswith(".png")) == ["0.png", "1.png", "2.png"]
    assert os.listdir(tmp_path / "out" / "grids") == ["grid_000.png"]


def test_a_second_run_into_the_same_folder_is_refused(data_dir, full_run, capsys, monkeypatch):
    """Issue 22.1: the finished run stays untouched; the one line names both ways out (exit status 1)."""
    from hf_dgm_training import run_main
    from train_cyclegan import main

    monkeypatch.delenv("HF_DGM_DEBUG", raising=False)
    before = sorted(os.listdir(full_run))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--data_dir", str(data_dir), "--output_dir", str(full_run), *TINY])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert ": error: " in lines[0] and "already holds another run" in lines[0]
    assert "--overwrite_output_dir" in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert sorted(os.listdir(full_run)) == before


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*trainA, trainB"):
        train_in_process("--data_dir", tmp_path / "missing", "--output_dir", tmp_path / "out", *TINY)

    only_a = make_unpaired_folder(tmp_path / "only_a", counts=(("trainA", 2),))
    with pytest.raises(FileNotFoundError, match="trainB does not exist"):
        load_unpaired_split(data_dir=str(only_a))
    empty = make_unpaired_folder(tmp_path / "empty", counts=(("trainA", 2), ("trainB", 0)))
    (empty / "trainB" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="trainB holds no images"):
        load_unpaired_split(data_dir=str(empty))
    with pytest.raises(ValueError, match="exactly one of --data_dir"):
        load_unpaired_split()


def test_hub_style_dataset_with_a_shorter_domain(tmp_path):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    images = [Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)) for i in range(4)]
    features = Features({"imageA": ImageFeature(), "imageB": ImageFeature()})
    dataset = Dataset.from_dict({"imageA": images, "imageB": images[:2] + [None, None]}, features=features)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    domain_a, domain_b = load_unpaired_split(dataset_name=str(tmp_path / "hub"), split="train")
    assert len(domain_a) == 4 and len(domain_b) == 2 and domain_b.column_names == ["image"]

    other = Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()}))
    (tmp_path / "other" / "data").mkdir(parents=True)
    other.to_parquet(str(tmp_path / "other" / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="imageA and imageB"):
        load_unpaired_split(dataset_name=str(tmp_path / "other"), split="train")


def test_sampler_follows_the_reference_order_and_augmentation():
    images_a = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 36, 36).contiguous()
    images_b = (100 + torch.arange(7, dtype=torch.uint8)).view(7, 1, 1, 1).expand(7, 3, 36, 36).contiguous()
    sampler = UnpairedSampler(images_a, images_b, crop_size=32, seed=3)
    assert sampler.steps_per_epoch == 7  # max(|A|, |B|)
    order = [batch[0] for batch in sampler.epoch_order(0)]
    assert sorted(order) == sorted(i % 5 for i in range(7)) and order == [b[0] for b in sampler.epoch_order(0)]
    assert order != [b[0] for b in sampler.epoch_order(1)] or order != [b[0] for b in sampler.epoch_order(2)]

    out_a, out_b = torch.empty(1, 3, 32, 32), torch.empty(1, 3, 32, 32)
    random.seed(0)
    drawn_b = set()
    for batch in sampler.epoch_order(0):
        sampler.fill_batch(out_a, out_b, batch)
        assert torch.all(out_a == batch[0] / 127.5 - 1)  # the A image of this step, mapped to [-1, 1]
        drawn_b.add(round((out_b[0, 0, 0, 0].item() + 1) * 127.5) - 100)
    assert len(drawn_b) > 1  # B is drawn at random every step

    # random crops and flips of a gradient image
    ramp = torch.arange(36, dtype=torch.uint8).view(1, 1, 1, 36).expand(1, 3, 36, 36).contiguous()
    sampler = UnpairedSampler(ramp, ramp, crop_size=32)
    first_columns = set()
    for _ in range(40):
        sampler.fill_batch(out_a, out_b, [0])
        row = ((out_a[0, 0, 0] + 1) * 127.5).round()
        assert torch.all(row.diff().abs() == 1)  # a contiguous crop, possibly mirrored
        first_columns.add((row[0].item(), row[1].item() > row[0].item()))
    assert len({left for left, _ in first_columns}) > 2 and {True, False} == {rising for _, rising in first_columns}

    # each of two processes gets its own half of every epoch
    shards = [UnpairedSampler(images_a, images_b, 32, seed=1, process_index=i, num_processes=2) for i in range(2)]
    assert shards[0].steps_per_epoch == 3
    full = UnpairedSampler(images_a, images_b, 32, seed=1).epoch_order(0)
    assert [b[0] for b in shards[0].epoch_order(0)] == [b[0] for b in full[0:6:2]]
    with pytest.raises(ValueError, match="smaller than the crop size"):
        UnpairedSampler(images_a[:, :, :30, :30], images_b, 32)


def test_learning_rate_schedule_is_the_references():
    from hf_dgm_training.cyclegan.step import learning_rate_factor

    factors = [learning_rate_factor(epoch, 20, 10) for epoch in range(20)]
    assert factors[:10] == [1.0] * 10
    assert factors[10:] == pytest.approx([1 - k / 11 for k in range(1, 11)])
    assert [learning_rate_factor(e, 4, 0) for e in range(4)] == [1.0] * 4


def make_step(model, options):
    from hf_dgm_training.cyclegan.step import CycleGANTrainStep, build_optimizers

    optimizer_g, optimizer_d = build_optimizers(model, 2e-4, (0.5, 0.999), options)
    config = model.config
    return CycleGANTrainStep(model, optimizer_g, optimizer_d, ImagePool(config.pool_size), ImagePool(config.pool_size),
                             options)


def test_fast_and_plain_steps_have_the_same_maths():
    from hf_dgm_training.cyclegan.step import FastPathOptions

    torch.manual_seed(0)
    config = CycleGANConfig(image_size=32, num_residual_blocks=1, generator_filters=8, discriminator_filters=8,
                            pool_size=2)
    plain_model = CycleGANModel(config)
    variants = {
        "plain": (plain_model, FastPathOptions()),
        "batched": (copy.deepcopy(plain_model), FastPathOptions(batch_passes=True)),
        "bf16": (copy.deepcopy(plain_model), FastPathOptions(batch_passes=True, autocast_dtype=torch.bfloat16)),
    }
    steps = {name: make_step(model, options) for name, (model, options) in variants.items()}
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1,
                torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1) for _ in range(4)]
    losses = {}
    for name, step in steps.items():
        random.seed(0)  # same pool decisions
        losses[name] = [step(a, b).clone() for a, b in batches]
    for plain, batched in zip(losses["plain"], losses["batched"]):
        torch.testing.assert_close(batched, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["bf16"][0], losses["plain"][0], rtol=0.05, atol=0.02)  # same init and batch
    # (weights are not compared: Adam turns float32 noise in near-zero gradients, e.g. of the biases before an
    # instance norm, into full-size steps, so equal maths shows in the losses, not in bitwise equal weights)
    # the discriminators were frozen for the generator update and trained by their own
    assert all(p.requires_grad for p in plain_model.discriminator_a.parameters())


def test_a_failing_torch_compile_falls_back_to_the_same_maths(monkeypatch):
    from hf_dgm_training.cyclegan import step as cyclegan_step
    from hf_dgm_training.cyclegan.step import FastPathOptions

    def broken_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(cyclegan_step.torch, "compile", broken_compile)
    torch.manual_seed(0)
    config = CycleGANConfig(image_size=32, num_residual_blocks=1, generator_filters=8, discriminator_filters=8)
    eager_model = CycleGANModel(config)
    compiled_model = copy.deepcopy(eager_model)
    eager = make_step(eager_model, FastPathOptions(batch_passes=True))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        fallback = make_step(compiled_model, FastPathOptions(batch_passes=True, torch_compile=True))
        a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
        random.seed(0)
        got = fallback(a, b)
    random.seed(0)
    torch.testing.assert_close(got, eager(a, b))
    described = fallback.describe()
    assert not described["torch_compile"] and "no compiler here" in described["fallbacks"][0]
    assert all(p.requires_grad for p in compiled_model.discriminator_a.parameters())


def test_grid_pngs_are_small_and_optional_lossless(tmp_path):
    """A 4-row grid of 128x128 tiles: a fraction of the lossless size as a palette PNG, lossless on request."""
    from hf_dgm_training.figures import compact_png, fit_tiles, save_small_grid

    rng = np.random.default_rng(0)
    # smooth colour fields with texture, closer to photos than white noise (which no palette compresses)
    base = torch.nn.functional.interpolate(torch.from_numpy(rng.random((24, 3, 16, 16), dtype=np.float32)),
                                           size=(128, 128), mode="bicubic", align_corners=False)
    images = (base + torch.from_numpy(rng.normal(0, 0.04, (24, 3, 128, 128)).astype(np.float32))).clamp(0, 1)
    save_small_grid(images, str(tmp_path / "lossless.png"), nrow=6, colors=0)
    save_small_grid(images, str(tmp_path / "small.png"), nrow=6)
    lossless, small = (os.path.getsize(tmp_path / name) for name in ("lossless.png", "small.png"))
    assert small < 300_000 and small < 0.6 * lossless, (small, lossless)
    with Image.open(tmp_path / "small.png") as image, Image.open(tmp_path / "lossless.png") as full:
        assert image.size == full.size == (6 * 130 + 2, 4 * 130 + 2) and image.mode == "P" and full.mode == "RGB"
        error = np.abs(np.asarray(image.convert("RGB"), np.float32) - np.asarray(full, np.float32)).mean()
    # mean absolute error in 8-bit levels: ~14 for these random colours spread over the whole RGB cube (a
    # palette's worst case); ~5 on the real horse2zebra grids of docs/RESULTS.md#cyclegan-quality
    assert error < 16

    assert fit_tiles(images[:2], 128) is not None and fit_tiles(images[:2], 128).shape[-1] == 128
    assert fit_tiles(images[:2], 64).shape[-2:] == (64, 64) and fit_tiles(images[:2], 0).shape[-1] == 128
    compact_png(str(tmp_path / "lossless.png"), 0)  # 0 leaves the file alone
    assert os.path.getsize(tmp_path / "lossless.png") == lossless


def test_fast_path_defaults_leave_torch_compile_off():
    """Measured on an H200: CUDA graphs without torch.compile 101 it/s, with it 25.6 it/s; compile is opt-in."""
    from hf_dgm_training.cyclegan.step import resolve_fast_path
    from train_cyclegan import parse_args

    config = CycleGANConfig(image_size=32)
    cuda = torch.device("cuda")  # resolving options needs no GPU
    options = resolve_fast_path(parse_args(["--data_dir", "x", "--mixed_precision", "bf16"]), cuda, 1, config)
    assert not options.torch_compile
    assert options.cuda_graphs and options.channels_last and options.fused_optimizer and options.batch_passes
    assert options.autocast_dtype == torch.bfloat16
    opted_in = resolve_fast_path(parse_args(["--data_dir", "x", "--torch_compile", "true"]), cuda, 1, config)
    assert opted_in.torch_compile and opted_in.cuda_graphs
    two_gpus = resolve_fast_path(parse_args(["--data_dir", "x"]), cuda, 2, config)
    assert not two_gpus.cuda_graphs and not two_gpus.torch_compile and two_gpus.fused_optimizer
    plain = resolve_fast_path(parse_args(["--data_dir", "x", "--fast_path", "false"]), cuda, 1, config)
    assert not (plain.torch_compile or plain.cuda_graphs or plain.channels_last or plain.fused_optimizer)
    with pytest.raises(SystemExit):
        parse_args(["--data_dir", "x", "--grid_colors", "1"])


def test_checkpointing_no_writes_no_checkpoint_and_a_bad_value_is_a_clear_error(data_dir, tmp_path):
    output_dir = tmp_path / "no_checkpoints"
    result = run_script("--data_dir", data_dir, "--output_dir", output_dir, *TINY, "--checkpointing_steps", "no",
                        "--max_train_steps", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (output_dir / "model.safetensors").exists() or any(output_dir.glob("*.safetensors"))
    assert not (output_dir / "checkpoints").exists() or not os.listdir(output_dir / "checkpoints")
    result = run_script("--data_dir", data_dir, "--output_dir", tmp_path / "bad", *TINY, "--checkpointing_steps", "0")
    assert result.returncode != 0
    assert "--checkpointing_steps must be 'epoch', a positive number of steps, a duration" in result.stderr
