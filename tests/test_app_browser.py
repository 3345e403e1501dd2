"""The Gradio demo (app.py) in a real browser: the system's Chromium driven by Playwright.

The fixture trains a tiny MAF and a tiny CycleGAN with the training scripts on synthetic data (seconds), starts
`python app.py` on a loopback port with them, and the tests use every tab as a person would: upload an image (or
pick an example), press the button, wait for the outputs, and check them against the pipelines run here on the same
image (same score and verdict text, same pixels). The browser may reach only the app: other hosts resolve to nothing
and any request to them fails the test.

Screenshots of the tabs go to pytest's temporary folder; with HF_DGM_UPDATE_SCREENSHOTS=1 also to docs/figures/
(demo_*.png, committed: the README shows them).

Skipped, with the reason, where gradio or Playwright is not installed (`pip install -e .[demo]`) or no Chromium is
(`apt-get install chromium`; scripts/run_tests.sh installs it where it can).
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from synthetic_data import make_mvtec_category, make_unpaired_folder


pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[demo])")
pytest.importorskip("playwright", reason="Playwright is not installed (pip install -e .[demo])")
from playwright.sync_api import sync_playwright  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")
TIMEOUT_MS = 90_000  # the first request of a tab runs the model on 2 shared CPU cores


def find_chromium():
    """The system Chromium: $HF_DGM_CHROMIUM, Debian's binary (not its shell wrapper), or one on the PATH."""
    candidates = [os.environ.get("HF_DGM_CHROMIUM"), "/usr/lib/chromium/chromium"]
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("no system Chromium found (apt-get install chromium, or set HF_DGM_CHROMIUM)", allow_module_level=True)


def run_script(script, *args):
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *map(str, args)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def free_loopback_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(tmp_path, name, *args):
    """`python app.py ...` on a free loopback port; returns (process, url, log path) once it answers."""
    port = free_loopback_port()
    log_path = tmp_path / f"{name}.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               GRADIO_TEMP_DIR=str(tmp_path / f"{name}-gradio"))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--server_port", str(port), *args],
                                   cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url, log_path
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"app.py did not answer at {url} within 180 s:\n{log_path.read_text()[-4000:]}")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MAF (16x16 RGB) and a tiny CycleGAN (32x32), trained by the scripts on synthetic data; the MAF also
    calibrated by detect_anomalies.py on other good images (its threshold travels in the saved folder)."""
    root = tmp_path_factory.mktemp("demo")
    category = make_mvtec_category(str(root / "capsule"), size=16, num_train=12, num_test_good=2,
                                   defects=(("crack", 2), ("poke", 1)))
    held_out = make_mvtec_category(str(root / "held-out"), size=16, num_train=8, seed=1)
    maf_dir, calibrated_dir = root / "maf", root / "maf-calibrated"
    run_script("train_maf.py", "--data_dir", category, "--output_dir", maf_dir, "--image_size", 16,
               "--hidden_sizes", 32, 32, "--num_blocks", 2, "--per_device_train_batch_size", 4,
               "--num_train_epochs", 2, "--validation_split_percentage", 0)  # no validation images: uncalibrated
    run_script("detect_anomalies.py", "--model_name_or_path", maf_dir, "--data_dir", category,
               "--output_dir", root / "report", "--calibration_data", os.path.join(held_out, "train", "good"),
               "--target_fpr", 0.25, "--save_calibrated_model", calibrated_dir)
    unpaired = make_unpaired_folder(str(root / "unpaired"), size=32)
    cyclegan_dir = root / "cyclegan"
    run_script("train_cyclegan.py", "--data_dir", unpaired, "--output_dir", cyclegan_dir, "--image_size", 32,
               "--num_residual_blocks", 1, "--generator_filters", 8, "--discriminator_filters", 8,
               "--pool_size", 3, "--num_grid_images", 2, "--num_train_epochs", 1)
    return {"category": category, "maf": maf_dir, "maf_calibrated": calibrated_dir, "unpaired": unpaired,
            "cyclegan": cyclegan_dir}


@pytest.fixture(scope="module")
def app_url(trained, tmp_path_factory):
    """The app on the calibrated MAF and the CycleGAN, with examples for both."""
    process, url, log_path = start_app(
        tmp_path_factory.mktemp("app"), "app", "--maf_model", trained["maf_calibrated"],
        "--cyclegan_model", trained["cyclegan"], "--maf_examples", trained["category"],
        "--cyclegan_examples", trained["unpaired"])
    yield url
    stop(process)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        # No sandbox: CI runs as root; /tmp instead of a possibly small /dev/shm; every host name but loopback
        # resolves to nothing.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    outside = []

    def only_loopback(route):
        host = route.request.url.split("/")[2].split(":")[0] if "://" in route.request.url else ""
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(app_url)
    yield page
    context.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"


def save_screenshot(page, name, tmp_path):
    """A small PNG (64 colours) of the page, in tmp_path and, with HF_DGM_UPDATE_SCREENSHOTS=1, in docs/figures/."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB").quantize(colors=64)
    image.save(tmp_path / name, optimize=True)
    if os.environ.get("HF_DGM_UPDATE_SCREENSHOTS") == "1":
        image.save(os.path.join(FIGURES, name), optimize=True)


def fetch_image(page, selector):
    """The image that an <img> shows, fetched from its src (the app serves lossless PNGs)."""
    source = page.locator(selector).first.get_attribute("src")
    with urllib.request.urlopen(source, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def wait_for_text(page, selector, previous=""):
    page.wait_for_function(
        "([selector, previous]) => { const box = document.querySelector(selector);"
        " return box && box.value.length > 0 && box.value !== previous; }",
        arg=[selector, previous], timeout=TIMEOUT_MS)
    return page.locator(selector).input_value()


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def upload(page, elem_id, path):
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


# ---------------------------------------------------------------------------------------------------- tests
def test_anomaly_tab_shows_the_pipelines_score_verdict_and_heatmap(page, trained, tmp_path):
    from transformers import pipeline

    from app import example_images, format_score, format_verdict

    detector = pipeline("anomaly-detection", model=str(trained["maf_calibrated"]), trust_remote_code=True,
                        device="cpu")
    defective = os.path.join(trained["category"], "test", "crack", "000.png")
    expected = detector(defective)
    assert expected["threshold"] is not None  # the calibration came with the folder

    open_tab(page, "Anomaly detection")
    upload(page, "anomaly-input", defective)
    score = wait_for_text(page, "#anomaly-score textarea")
    verdict = page.locator("#anomaly-verdict textarea").input_value()
    assert score == format_score(expected) and float(score) == pytest.approx(expected["score"], abs=0.005)
    assert verdict == format_verdict(expected)
    assert verdict.startswith("ANOMALOUS" if expected["is_anomalous"] else "normal")
    assert f"threshold {expected['threshold']:.2f}" in verdict
    page.wait_for_selector("#anomaly-heatmap img", timeout=TIMEOUT_MS)
    heatmap = fetch_image(page, "#anomaly-heatmap img")
    # The pipeline's heatmap with its colour bar: on the calibrated scale, the threshold marked.
    assert expected["heatmap_scale"]["note"] is None and expected["heatmap_scale"]["threshold"] is not None
    with_bar = detector(defective, colorbar=True)["heatmap"]
    assert heatmap.size == with_bar.size and heatmap.height >= 256 and heatmap.width > heatmap.height
    assert np.array_equal(np.asarray(heatmap), np.asarray(with_bar))
    assert "one colour scale for every image" in page.locator("#anomaly-description").inner_text()
    save_screenshot(page, "demo_anomaly.png", tmp_path)

    # The examples are captioned with their defect type; picking one scores that image: the good one, of the first
    # image of each test/<type> folder.
    examples = example_images(trained["category"], ("test",), 8)
    captions = page.locator("#anomaly-examples .caption-label").all_inner_texts()
    assert captions == [os.path.basename(os.path.dirname(path)) for path in examples] == ["crack", "good", "poke"]
    good = os.path.join(trained["category"], "test", "good", "000.png")
    page.locator("#anomaly-examples button.thumbnail-item").nth(examples.index(good)).click()
    new_score = wait_for_text(page, "#anomaly-score textarea", previous=score)
    expected_good = detector(good)
    assert new_score == format_score(expected_good)
    assert page.locator("#anomaly-verdict textarea").input_value() == format_verdict(expected_good)


def shown_gallery(page, previous=()):
    """The images of the sampling gallery (once they differ from `previous`), fetched as arrays."""
    page.wait_for_function(
        "previous => { const sources = [...document.querySelectorAll('#sampling-gallery img')].map(i => i.src);"
        " return sources.length >= 4 && !sources.some(source => previous.includes(source)); }",
        arg=list(previous), timeout=TIMEOUT_MS)
    sources = page.locator("#sampling-gallery img").evaluate_all("images => images.map(image => image.src)")
    shown = []
    for source in dict.fromkeys(sources):  # a gallery may show an image twice (thumbnail and preview)
        with urllib.request.urlopen(source, timeout=30) as response:
            shown.append(np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB")))
    return shown, sources


def test_sampling_tab_draws_the_models_samples_exact_and_refined(page, trained, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(trained["maf_calibrated"]), trust_remote_code=True).eval()

    def expected(**refinement):  # the tab's defaults: 4 samples, seed 0, temperature 0.7
        images = model.sample(4, generator=torch.Generator().manual_seed(0), temperature=0.7, **refinement)
        return (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    open_tab(page, "MAF sampling")
    page.locator("#sampling-button").click()
    shown, sources = shown_gallery(page)
    assert len(shown) == 4
    for image, reference in zip(shown, expected()):
        assert image.shape == (16, 16, 3)
        assert np.array_equal(image, reference)
    save_screenshot(page, "demo_sampling.png", tmp_path)

    # Refinement (MAFModel.sample's refine_steps) from the slider: density-guided, not the exact draws.
    page.locator("#sampling-refine input[type=number]").fill("3")
    page.locator("#sampling-refine input[type=number]").press("Enter")
    page.locator("#sampling-button").click()
    refined, _ = shown_gallery(page, previous=sources)
    references = expected(refine_steps=3)
    assert len(refined) == 4 and not all(np.array_equal(a, b) for a, b in zip(refined, shown))
    for image, reference in zip(refined, references):
        assert np.array_equal(image, reference)


def test_translation_tab_shows_the_pipelines_translation_in_both_directions(page, trained, tmp_path):
    from transformers import pipeline

    translator = pipeline("image-translation", model=str(trained["cyclegan"]), trust_remote_code=True, device="cpu")
    horse = os.path.join(trained["unpaired"], "testA", "0.png")

    open_tab(page, "CycleGAN translation")
    upload(page, "translation-input", horse)
    page.wait_for_selector("#translation-output img", timeout=TIMEOUT_MS)
    first_source = page.locator("#translation-output img").first.get_attribute("src")
    translated = fetch_image(page, "#translation-output img")
    assert translated.size == (32, 32)
    assert np.array_equal(np.asarray(translated), np.asarray(translator(horse)))
    save_screenshot(page, "demo_translation.png", tmp_path)

    page.get_by_label("B → A (b_to_a)").check()
    page.wait_for_function(
        "previous => { const image = document.querySelector('#translation-output img');"
        " return image && image.src !== previous; }", arg=first_source, timeout=TIMEOUT_MS)
    back = fetch_image(page, "#translation-output img")
    assert np.array_equal(np.asarray(back), np.asarray(translator(horse, direction="b_to_a")))


def test_uncalibrated_model_and_missing_model_are_explained_in_the_page(browser, trained, tmp_path):
    """The uncalibrated MAF gives scores and says how to calibrate; a CycleGAN folder that does not exist leaves its
    tab with the reason."""
    from transformers import pipeline

    from app import format_verdict

    process, url, log_path = start_app(tmp_path, "partial", "--maf_model", trained["maf"],
                                       "--cyclegan_model", tmp_path / "no-such-cyclegan")
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        good = os.path.join(trained["category"], "test", "good", "000.png")
        upload(page, "anomaly-input", good)
        wait_for_text(page, "#anomaly-score textarea")
        verdict = page.locator("#anomaly-verdict textarea").input_value()
        expected = pipeline("anomaly-detection", model=str(trained["maf"]), trust_remote_code=True, device="cpu")(good)
        assert expected["is_anomalous"] is None and verdict == format_verdict(expected)
        assert verdict.startswith("no verdict") and "model.calibrate(good_pixel_values)" in verdict
        open_tab(page, "CycleGAN translation")
        message = page.locator("#cyclegan-missing").inner_text(timeout=TIMEOUT_MS)
        assert message == (f"No model for this tab: the folder {tmp_path / 'no-such-cyclegan'} does not exist. "
                           "Train one with python scripts/train_cyclegan.py --data_dir <trainA/trainB folder> "
                           "--output_dir runs/h2z.")  # the command in code style: the page shows no backticks
        save_screenshot(page, "demo_missing_model.png", tmp_path)
        page.close()
    finally:
        stop(process)


def test_a_file_that_is_not_an_image_is_explained_in_the_page(page, tmp_path):
    """A non-image upload gets a message with the file's name and the reason, not a bare 'Error' badge."""
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels\n")
    open_tab(page, "Anomaly detection")
    upload(page, "anomaly-input", not_an_image)
    message = page.get_by_text("is not an image this demo can read").first
    message.wait_for(timeout=TIMEOUT_MS)
    text = message.inner_text()
    assert "notes.png is not an image this demo can read (PNG, JPEG, BMP or WebP): its content is in no image " \
        "format PIL knows." in text
    page.screenshot(path=str(tmp_path / "demo_not_an_image.png"), full_page=True)


def test_the_anomaly_tab_runs_the_feature_detector(browser, trained, tmp_path):
    """With --detector_model, the anomaly tab scores with the feature detector (its pipeline's score, verdict and
    heatmap with colour bar) and the sampling tab still samples the MAF."""
    from transformers import pipeline

    from app import format_score, format_verdict
    from test_app import tiny_feature_detector

    detector_dir = tiny_feature_detector(tmp_path / "detector")
    process, url, log_path = start_app(tmp_path, "detector", "--maf_model", trained["maf_calibrated"],
                                       "--detector_model", detector_dir)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(url)
        assert "FeatureMAFModel" in page.locator("#anomaly-description").inner_text(timeout=TIMEOUT_MS)
        defective = os.path.join(trained["category"], "test", "crack", "000.png")
        upload(page, "anomaly-input", defective)
        score = wait_for_text(page, "#anomaly-score textarea")
        detector = pipeline("anomaly-detection", model=str(detector_dir), trust_remote_code=True, device="cpu")
        expected = detector(defective, colorbar=True)
        assert score == format_score(expected)
        assert page.locator("#anomaly-verdict textarea").input_value() == format_verdict(expected)
        page.wait_for_selector("#anomaly-heatmap img", timeout=TIMEOUT_MS)
        assert np.array_equal(np.asarray(fetch_image(page, "#anomaly-heatmap img")), np.asarray(expected["heatmap"]))
        open_tab(page, "MAF sampling")
        assert page.locator("#sampling-button").is_visible()
        page.close()
    finally:
        stop(process)
