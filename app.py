"""Gradio demo of hf-dgm: anomaly detection and sampling with a MAF, image translation with a CycleGAN.

    pip install -e ".[demo]"
    python app.py --maf_model runs/maf --cyclegan_model runs/h2z --maf_examples ../shared/data/mvtec_capsule

Models are folders written by the training scripts (or `save_pretrained`) or Hub repo ids. They are loaded with
transformers' `pipeline(..., trust_remote_code=True)`: the model code and the pipelines travel with the model, so this
file needs neither this package nor a GPU, and a Hugging Face Space runs it with `requirements.txt` alone (set the
model ids as the Space's variables HF_DGM_MAF_MODEL and HF_DGM_CYCLEGAN_MODEL). A model that is missing or fails to
load leaves its tabs with a message that says why and how to get one; the other tabs work.
"""

import argparse
import inspect
import os

import gradio as gr
import torch
from PIL import Image
from transformers import pipeline


DEFAULT_MAF_MODEL = "runs/maf"  # the main job's output (bash scripts/run_maf_pipeline.sh)
DEFAULT_CYCLEGAN_MODEL = "runs/h2z"  # the README's train_cyclegan.py command
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIRECTIONS = {"A → B (a_to_b)": "a_to_b", "B → A (b_to_a)": "b_to_a"}
IMAGE_HEIGHT = 320
# Models work at small sizes (64×64 for the CPU preset): show their pixels enlarged and sharp.
CSS = """
#anomaly-input img, #anomaly-heatmap img, #translation-input img, #translation-output img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#sampling-gallery img { image-rendering: pixelated; }
"""


def parse_args(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--maf_model", default=env("HF_DGM_MAF_MODEL"),
                        help="MAF/IAF folder or Hub repo id for the anomaly-detection and sampling tabs (environment: "
                             f"HF_DGM_MAF_MODEL; when neither is set, {DEFAULT_MAF_MODEL} if it exists).")
    parser.add_argument("--cyclegan_model", default=env("HF_DGM_CYCLEGAN_MODEL"),
                        help="CycleGAN folder or Hub repo id for the translation tab (environment: "
                             f"HF_DGM_CYCLEGAN_MODEL; when neither is set, {DEFAULT_CYCLEGAN_MODEL} if it exists).")
    parser.add_argument("--maf_examples", default=env("HF_DGM_MAF_EXAMPLES"),
                        help="Example images for the anomaly tab: a folder of images, or an MVTec category folder (the "
                             "first image of every test/<type> folder is used). Environment: HF_DGM_MAF_EXAMPLES.")
    parser.add_argument("--cyclegan_examples", default=env("HF_DGM_CYCLEGAN_EXAMPLES"),
                        help="Example images for the translation tab: a folder of images, or an unpaired dataset "
                             "folder (testA, testB). Environment: HF_DGM_CYCLEGAN_EXAMPLES.")
    parser.add_argument("--max_examples", type=int, default=8, help="At most this many example images per tab.")
    parser.add_argument("--server_name", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to listen on (0.0.0.0 to reach the demo from other machines).")
    parser.add_argument("--server_port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="Port.")
    parser.add_argument("--device", default="cpu", help="Device of the models: cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    if args.max_examples < 0:
        parser.error(f"--max_examples must be >= 0, got {args.max_examples}.")
    return args


# ------------------------------------------------------------------------------------------------ loading
def looks_like_a_path(name: str) -> bool:
    """A Hub repo id is `name` or `namespace/name`; anything else (absolute, ./, ../, ~, deeper) is a folder path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_pipeline(task: str, name: str | None, default: str, how_to_get_one: str, device: str):
    """(pipeline, None) or (None, a message for the page) for a folder or Hub repo id."""
    if not name:
        if not os.path.isdir(default):
            return None, (f"No model for this tab: {default} does not exist. {how_to_get_one}, or pass a folder or "
                          "Hub repo id to app.py (see `python app.py --help`).")
        name = default
    if not os.path.isdir(name) and looks_like_a_path(name):
        return None, f"No model for this tab: the folder {name} does not exist. {how_to_get_one}."
    try:
        return pipeline(task, model=name, trust_remote_code=True, device=device), None
    except Exception as error:  # any failure becomes a message in the page, the other tabs still work
        where = "folder" if os.path.isdir(name) else "Hub repo id: no folder of that name exists here"
        return None, f"Could not load the {task} pipeline from {name!r} ({where}): {type(error).__name__}: {error}"


def example_images(folder: str | None, dataset_subfolders: tuple[str, ...], limit: int) -> list[str]:
    """Image files for gr.Examples: those in `folder`, or the first of each sub-folder for a dataset layout."""
    if not folder or limit == 0:
        return []
    if not os.path.isdir(folder):
        raise SystemExit(f"Examples folder {folder} does not exist; pass a folder of images.")

    def images_in(directory):
        return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                      if name.lower().endswith(IMAGE_SUFFIXES))

    found = images_in(folder)
    for subfolder in dataset_subfolders:
        root = os.path.join(folder, subfolder)
        if os.path.isdir(root):
            groups = sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry)))
            if groups:  # MVTec: test/good, test/crack, ...: one image of each type
                for group in groups:
                    found += images_in(os.path.join(root, group))[:1]
            else:  # testA, testB: a few of each
                found += images_in(root)[: max(1, limit // 2)]
    return found[:limit]


# ------------------------------------------------------------------------------------------- formatting
def format_score(result: dict) -> str:
    return f"{result['score']:.2f}"


def format_verdict(result: dict) -> str:
    if result["is_anomalous"] is None:
        return f"no verdict: {result['message']}"
    relation = ">" if result["is_anomalous"] else "≤"
    word = "ANOMALOUS" if result["is_anomalous"] else "normal"
    return f"{word} (score {result['score']:.2f} {relation} threshold {result['threshold']:.2f})"


def describe_maf(detector) -> str:
    model = detector.model
    config = model.config
    size = f"{config.image_size}×{config.image_size}×{config.num_channels}"
    calibration = getattr(config, "anomaly_calibration", None)
    if calibration:
        threshold = calibration["thresholds"][calibration["method"]]
        state = (f"calibrated: score `{calibration['method']}`, threshold {threshold:.2f} at a "
                 f"{calibration['target_fpr']:.0%} false-positive rate on {calibration['num_images']} good images")
    else:
        state = "not calibrated: the score is the image's negative log-likelihood (nats), with no verdict"
    if getattr(config, "patch_size", None):
        state += (f"; a density of {config.patch_size}×{config.patch_size} patches (stride {config.patch_stride}), "
                  "whose samples are mosaics of independent patches")
    return f"Model: `{model.name_or_path}` ({type(model).__name__}, {size}, {config.num_blocks} blocks; {state})"


def describe_cyclegan(translator) -> str:
    model = translator.model
    size = model.config.image_size
    return f"Model: `{model.name_or_path}` ({type(model).__name__}, {size}×{size})"


# -------------------------------------------------------------------------------------------- the demo
def build_demo(detector, maf_message, translator, cyclegan_message, maf_examples=(), cyclegan_examples=()):
    with gr.Blocks(title="hf-dgm demo", analytics_enabled=False) as demo:
        gr.Markdown("# hf-dgm: MAF anomaly detection and sampling, CycleGAN translation")
        with gr.Tab("Anomaly detection", id="anomaly"):
            if detector is None:
                gr.Markdown(f"**{maf_message}**", elem_id="maf-missing")
            else:
                gr.Markdown(describe_maf(detector) + ". Higher scores are more anomalous; the heatmap shows where "
                            "in the image the score comes from (colours scaled per image).")
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(type="pil", label="Image", height=IMAGE_HEIGHT, elem_id="anomaly-input")
                        if maf_examples:
                            gr.Examples(examples=[[path] for path in maf_examples], inputs=[image],
                                        label="Examples", elem_id="anomaly-examples")
                    with gr.Column():
                        heatmap = gr.Image(type="pil", format="png", label="Heatmap", interactive=False,
                                           height=IMAGE_HEIGHT, elem_id="anomaly-heatmap")
                        score = gr.Textbox(label="Score", interactive=False, elem_id="anomaly-score")
                        verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="anomaly-verdict")

                def detect(picture):
                    if picture is None:
                        return None, "", ""
                    result = detector(picture)
                    return result["heatmap"], format_score(result), format_verdict(result)

                image.change(detect, inputs=[image], outputs=[heatmap, score, verdict])

        with gr.Tab("MAF sampling", id="sampling"):
            if detector is None:
                gr.Markdown(f"**{maf_message}**", elem_id="sampling-missing")
            else:
                model = detector.model
                refine = "refine_steps" in inspect.signature(model.sample).parameters
                refinement = (" Refinement steps above 0 then move them towards higher density (MAFModel.sample's "
                              "refine_steps): density-guided images, no longer exact draws from the model."
                              if refine else "")
                gr.Markdown(describe_maf(detector) + ". Samples are drawn on the CPU or the --device from latents "
                            "N(0, temperature²)." + refinement)
                with gr.Row():
                    with gr.Column():
                        num_samples = gr.Slider(1, 8, value=4, step=1, label="Number of samples",
                                                elem_id="sampling-count")
                        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="sampling-seed")
                        temperature = gr.Slider(0.05, 1.5, value=0.7, step=0.05, label="Temperature",
                                                elem_id="sampling-temperature")
                        inputs = [num_samples, seed, temperature]
                        if refine:
                            inputs.append(gr.Slider(0, 1000, value=0, step=10, label="Refinement steps (refine_steps; "
                                                    "300 gives data-like samples, docs/maf.md: What samples look like)",
                                                    elem_id="sampling-refine"))
                        sample_button = gr.Button("Sample", variant="primary", elem_id="sampling-button")
                    gallery = gr.Gallery(label="Samples", format="png", columns=4, height=IMAGE_HEIGHT,
                                         elem_id="sampling-gallery")

                def draw(count, seed_value, temperature_value, refine_steps=None):
                    generator = torch.Generator().manual_seed(int(seed_value or 0))
                    kwargs = {"refine_steps": int(refine_steps)} if refine_steps else {}
                    images = model.sample(int(count), generator=generator, temperature=float(temperature_value),
                                          **kwargs)
                    arrays = (images.float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
                    arrays = arrays.permute(0, 2, 3, 1).numpy()
                    return [Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array) for array in arrays]

                sample_button.click(draw, inputs=inputs, outputs=[gallery])

        with gr.Tab("CycleGAN translation", id="translation"):
            if translator is None:
                gr.Markdown(f"**{cyclegan_message}**", elem_id="cyclegan-missing")
            else:
                gr.Markdown(describe_cyclegan(translator) + ". A → B uses generator G_A, B → A generator G_B; the "
                            "output has the model's size.")
                with gr.Row():
                    with gr.Column():
                        source = gr.Image(type="pil", label="Image", height=IMAGE_HEIGHT, elem_id="translation-input")
                        direction = gr.Radio(list(DIRECTIONS), value=next(iter(DIRECTIONS)), label="Direction",
                                             elem_id="translation-direction")
                        if cyclegan_examples:
                            gr.Examples(examples=[[path] for path in cyclegan_examples], inputs=[source],
                                        label="Examples", elem_id="translation-examples")
                    translated = gr.Image(type="pil", format="png", label="Translation", interactive=False,
                                          height=IMAGE_HEIGHT, elem_id="translation-output")

                def translate(picture, direction_label):
                    if picture is None:
                        return None
                    return translator(picture, direction=DIRECTIONS[direction_label])

                source.change(translate, inputs=[source, direction], outputs=[translated])
                direction.change(translate, inputs=[source, direction], outputs=[translated])
    return demo


def main(argv=None):
    args = parse_args(argv)
    detector, maf_message = load_pipeline(
        "anomaly-detection", args.maf_model, DEFAULT_MAF_MODEL,
        "Train one with `bash scripts/run_maf_pipeline.sh --preset cpu` (writes runs/maf)", args.device)
    translator, cyclegan_message = load_pipeline(
        "image-translation", args.cyclegan_model, DEFAULT_CYCLEGAN_MODEL,
        "Train one with `python scripts/train_cyclegan.py --data_dir <trainA/trainB folder> --output_dir runs/h2z`",
        args.device)
    for message in (maf_message, cyclegan_message):
        if message:
            print(message)
    maf_examples = example_images(args.maf_examples, ("test",), args.max_examples)
    cyclegan_examples = example_images(args.cyclegan_examples, ("testA", "testB"), args.max_examples)
    demo = build_demo(detector, maf_message, translator, cyclegan_message, maf_examples, cyclegan_examples)
    demo.launch(server_name=args.server_name, server_port=args.server_port, ssr_mode=False, css=CSS)


if __name__ == "__main__":
    main()
