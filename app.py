"""Gradio demo of hf-dgm: anomaly detection (the feature detector or a MAF), sampling with a MAF, image translation
with a CycleGAN.

    pip install -e ".[demo]"
    python app.py --maf_model runs/maf --detector_model runs/maf/detector --cyclegan_model runs/h2z \
        --maf_examples ../shared/data/mvtec_capsule

Models are folders written by the training scripts (or `save_pretrained`) or Hub repo ids. They are loaded with
transformers' `pipeline(..., trust_remote_code=True)`: the model code and the pipelines travel with the model, so this
file needs neither this package nor a GPU, and a Hugging Face Space runs it with `requirements.txt` alone (set the
model ids as the Space's variables HF_DGM_MAF_MODEL, HF_DGM_DETECTOR_MODEL and HF_DGM_CYCLEGAN_MODEL). The anomaly tab
uses the detector (`--detector_model`, default runs/maf/detector when it exists), else the MAF; the sampling tab needs
a MAF or IAF. A model that is missing or fails to load leaves its tabs with a message that says why and how to get
one; the other tabs work. Errors of a request (an upload that is not an image, ...) are shown in the page.
"""

import argparse
import inspect
import os

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError
from transformers import pipeline


DEFAULT_MAF_MODEL = "runs/maf"  # the main job's output (bash scripts/run_maf_pipeline.sh)
DEFAULT_DETECTOR_MODEL = "runs/maf/detector"  # the main job's feature detector
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
                        help="MAF/IAF folder or Hub repo id for the sampling tab, and for the anomaly tab when there "
                             "is no detector (environment: HF_DGM_MAF_MODEL; when neither is set, "
                             f"{DEFAULT_MAF_MODEL} if it exists).")
    parser.add_argument("--detector_model", default=env("HF_DGM_DETECTOR_MODEL"),
                        help="Anomaly detector folder or Hub repo id for the anomaly tab: the feature detector "
                             "(train_maf.py --flow_type feature_maf) or any MAF/IAF (environment: "
                             f"HF_DGM_DETECTOR_MODEL; when neither is set, {DEFAULT_DETECTOR_MODEL} if it exists, "
                             "else the --maf_model).")
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
    """A Hub repo id is `name` or `namespace/name`; anything else (absolute, ./, ../, ~, deeper) is a folder path. With
    the training library installed, its rule (`hf_dgm_training.model_loading.looks_local`: also `runs/mafx` while
    `runs/` exists) decides."""
    try:
        from hf_dgm_training.model_loading import looks_local
    except ImportError:  # a Space runs without the package
        return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    return looks_local(name)


def did_you_mean(name: str) -> str:
    """'; did you mean <folder>?' for a mistyped local folder, from the training library's suggestion
    (`hf_dgm_training.model_loading`); '' when it has none or is not installed (a Space)."""
    try:
        from hf_dgm_training.model_loading import _closest_names
    except ImportError:
        return ""
    hint = _closest_names(name)
    return hint if "did you mean" in hint else ""


def load_pipeline(task: str, name: str | None, default: str, how_to_get_one: str, device: str):
    """(pipeline, None) or (None, a message for the page) for a folder or Hub repo id."""
    if not name:
        if not os.path.isdir(default):
            return None, (f"No model for this tab: {default} does not exist. {how_to_get_one}, or pass a folder or "
                          "Hub repo id to app.py (see `python app.py --help`).")
        name = default
    if not os.path.isdir(name) and looks_like_a_path(name):
        hint = did_you_mean(name) or "."
        return None, f"No model for this tab: the folder {name} does not exist{hint} {how_to_get_one}."
    try:
        return pipeline(task, model=name, trust_remote_code=True, device=device), None
    except Exception as error:  # any failure becomes a message in the page, the other tabs still work
        where = "folder" if os.path.isdir(name) else \
            f"Hub repo id: no folder of that name exists here{did_you_mean(name)}"
        return None, f"Could not load the {task} pipeline from {name!r} ({where}): {type(error).__name__}: {error}"


def can_sample(detector) -> bool:
    """Whether the pipeline's model generates images (a MAF or IAF; the feature detector does not)."""
    return detector is not None and callable(getattr(detector.model, "sample", None))


def load_models(args):
    """(detector, its message, sampler, its message): the anomaly tab's pipeline (the --detector_model, default
    runs/maf/detector when it exists, else the MAF) and the sampling tab's MAF/IAF pipeline."""
    train_maf = "Train one with `bash scripts/run_maf_pipeline.sh --preset cpu` (writes runs/maf)"
    maf, maf_message = load_pipeline("anomaly-detection", args.maf_model, DEFAULT_MAF_MODEL, train_maf, args.device)
    if args.detector_model or os.path.isdir(DEFAULT_DETECTOR_MODEL):
        detector, detector_message = load_pipeline(
            "anomaly-detection", args.detector_model, DEFAULT_DETECTOR_MODEL,
            "Train one with `python scripts/train_maf.py --flow_type feature_maf --data_dir <category> --output_dir "
            "runs/maf/detector`", args.device)
    else:
        detector, detector_message = maf, maf_message
    if maf is not None and not can_sample(maf):
        maf, maf_message = None, (f"The sampling tab needs a MAF or IAF; {args.maf_model or DEFAULT_MAF_MODEL} is a "
                                  f"{type(maf.model).__name__}, which scores images but does not generate them. Pass "
                                  "a MAF with --maf_model (the main job's runs/maf) and the detector with "
                                  "--detector_model.")
    return detector, detector_message, maf, maf_message


def example_images(folder: str | None, dataset_subfolders: tuple[str, ...], limit: int) -> list[str]:
    """Image files for the examples: those in `folder`, or the first of each sub-folder for a dataset layout."""
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


def example_caption(path: str, folder: str) -> str:
    """The caption of an example: its defect type (the name of its folder, test/<type>/...) in a dataset layout, else
    its file name."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) if parent == os.path.abspath(folder) else os.path.basename(parent)


def read_upload(component, payload):
    """`component.preprocess(payload)`, with a file that is not an image said in the page (gr.Error) by name."""
    try:
        return type(component).preprocess(component, payload)
    except Exception as error:
        name = getattr(payload, "orig_name", None) or "The uploaded file"
        reason = ("its content is in no image format PIL knows" if isinstance(error, UnidentifiedImageError)
                  else f"{type(error).__name__}: {error}")
        raise gr.Error(f"{name} is not an image this demo can read (PNG, JPEG, BMP or WebP): {reason}.",
                       title="Not an image") from error


def image_input(**kwargs):
    """gr.Image for uploads whose failures are messages in the page (a bare 'Error' badge otherwise)."""
    component = gr.Image(type="pil", format="png", **kwargs)  # lossless: an example picked is scored as its file
    component.preprocess = lambda payload: read_upload(component, payload)
    return component


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
    kind = f"{config.num_blocks} blocks"
    if config.model_type == "feature_maf":
        kind += f" over the features of a frozen {config.backbone or 'EfficientNet-Lite'} backbone"
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
    return f"Model: `{model.name_or_path}` ({type(model).__name__}, {size}, {kind}; {state})"


def describe_heatmap(detector) -> str:
    """What the heatmap's colours mean for this model (its pipeline draws them: `heatmap_scale` of each result)."""
    calibration = getattr(detector.model.config, "anomaly_calibration", None)
    if calibration and calibration.get("display_ranges"):
        return ("The heatmap has one colour scale for every image, from the good validation images: blue is a typical "
                "good location, the black line on the colour bar the decision level, red above it; colours can be "
                "compared between images")
    if calibration:
        return ("The heatmap's colours are scaled per image (this model was calibrated before display ranges were "
                "saved; calibrate it again for one scale): they show where in the image the score comes from, not "
                "whether it is anomalous")
    return ("The heatmap's colours are scaled per image (the model is not calibrated): they show where in the image "
            "the score comes from, not whether it is anomalous")


def describe_cyclegan(translator) -> str:
    model = translator.model
    size = model.config.image_size
    return f"Model: `{model.name_or_path}` ({type(model).__name__}, {size}×{size})"


# -------------------------------------------------------------------------------------------- the demo
def build_demo(detector, detector_message, sampler, sampler_message, translator, cyclegan_message, maf_examples=(),
               cyclegan_examples=(), maf_examples_folder=None):
    with gr.Blocks(title="hf-dgm demo", analytics_enabled=False) as demo:
        gr.Markdown("# hf-dgm: MAF anomaly detection and sampling, CycleGAN translation")
        with gr.Tab("Anomaly detection", id="anomaly"):
            if detector is None:
                gr.Markdown(f"**{detector_message}**", elem_id="maf-missing")
            else:
                gr.Markdown(describe_maf(detector) + ". Higher scores are more anomalous. " + describe_heatmap(detector)
                            + ".", elem_id="anomaly-description")
                with gr.Row():
                    with gr.Column():
                        image = image_input(label="Image", height=IMAGE_HEIGHT, elem_id="anomaly-input")
                        if maf_examples:
                            examples = gr.Gallery(
                                value=[(path, example_caption(path, maf_examples_folder or os.path.dirname(path)))
                                       for path in maf_examples],
                                label="Examples (click one)", columns=min(4, len(maf_examples)), height="auto",
                                allow_preview=False, object_fit="contain", elem_id="anomaly-examples")

                            def pick(event: gr.SelectData):
                                return maf_examples[event.index]

                            examples.select(pick, inputs=None, outputs=[image])
                    with gr.Column():
                        heatmap = gr.Image(type="pil", format="png", label="Heatmap", interactive=False,
                                           height=IMAGE_HEIGHT, elem_id="anomaly-heatmap")
                        score = gr.Textbox(label="Score", interactive=False, elem_id="anomaly-score")
                        verdict = gr.Textbox(label="Verdict", interactive=False, elem_id="anomaly-verdict")

                def detect(picture):
                    if picture is None:
                        return None, "", ""
                    try:
                        result = detector(picture, colorbar=True)
                    except Exception as error:
                        raise gr.Error(f"Could not score this image: {type(error).__name__}: {error}") from error
                    return result["heatmap"], format_score(result), format_verdict(result)

                image.change(detect, inputs=[image], outputs=[heatmap, score, verdict])

        with gr.Tab("MAF sampling", id="sampling"):
            if sampler is None:
                gr.Markdown(f"**{sampler_message}**", elem_id="sampling-missing")
            else:
                model = sampler.model
                parameters = inspect.signature(model.sample).parameters
                refine = "refine_steps" in parameters
                refinement = (" Refinement steps above 0 then move them towards higher density (MAFModel.sample's "
                              "refine_steps): density-guided images, no longer exact draws from the model."
                              if refine else "")
                gr.Markdown(describe_maf(sampler) + ". Samples are drawn on the CPU or the --device from latents "
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

                def draw(count, seed_value, temperature_value, refine_steps=None,
                         progress=gr.Progress(track_tqdm=True)):
                    generator = torch.Generator().manual_seed(int(seed_value or 0))
                    kwargs = {"refine_steps": int(refine_steps)} if refine_steps else {}
                    if "show_progress" in parameters:  # its tqdm bars become the page's progress bar
                        kwargs["show_progress"] = True
                    try:
                        images = model.sample(int(count), generator=generator, temperature=float(temperature_value),
                                              **kwargs)
                    except Exception as error:
                        raise gr.Error(f"Sampling failed: {type(error).__name__}: {error}") from error
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
    detector, detector_message, sampler, sampler_message = load_models(args)
    translator, cyclegan_message = load_pipeline(
        "image-translation", args.cyclegan_model, DEFAULT_CYCLEGAN_MODEL,
        "Train one with `python scripts/train_cyclegan.py --data_dir <trainA/trainB folder> --output_dir runs/h2z`",
        args.device)
    for message in dict.fromkeys((detector_message, sampler_message, cyclegan_message)):
        if message:
            print(message)
    maf_examples = example_images(args.maf_examples, ("test",), args.max_examples)
    cyclegan_examples = example_images(args.cyclegan_examples, ("testA", "testB"), args.max_examples)
    demo = build_demo(detector, detector_message, sampler, sampler_message, translator, cyclegan_message, maf_examples,
                      cyclegan_examples, args.maf_examples)
    demo.launch(server_name=args.server_name, server_port=args.server_port, ssr_mode=False, css=CSS)


if __name__ == "__main__":
    main()
