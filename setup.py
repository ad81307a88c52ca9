from setuptools import find_packages, setup

setup(
    name="xllava_jax",
    version="0.1.0",
    description="JAX-native X-LLaVA: bilingual (Korean + English) LLaVA-1.5 recipe",
    python_requires=">=3.11",
    packages=find_packages(include=["xllava_jax", "xllava_jax.*"]),
    package_data={"xllava_jax.datagen": ["templates/*.txt", "templates/*.json", "templates/seeds/*.json"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorstore==0.1.86",  # read directly to check a checkpoint's files before a restore
        "grain==0.2.18",
        "array_record==0.8.6",
        "sentencepiece==0.2.3",
        "tensorflow-datasets==4.9.10",
        "einops==0.8.2",
        "numpy==2.4.6",
        "pillow==13.0.0",
        "safetensors==0.8.0",
        "ml_collections",
        "tqdm",
        "importlib_resources",  # tensorflow-datasets imports it lazily when building a dataset
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
        "pylopdf-fonts-ko==0.1.1",  # Noto Sans KR (9.6 MB, OFL): the Korean text in the demo's report.png
        "protobuf==7.36.2",  # the vocabulary tools edit SentencePiece model protos
        "ml_dtypes==0.7.0",
        "absl-py==2.5.1",
    ],
    extras_require={
        "test": [
            "torch==2.13.0",
            "transformers==5.24.0",
            "peft==0.21.2",
            "openai==3.57.0",
            "pytest",
        ],
        # Reading PyTorch .bin checkpoints (`xllava convert hf2jax --allow-bin`); exact, as a range pulls a CUDA build.
        "torch": ["torch==2.13.0"],
        # Accelerators, at the versions jax 0.10.2's own `cuda12` and `tpu` extras require.
        "cuda": ["jax-cuda12-plugin[with-cuda]==0.10.2"],
        "tpu": ["libtpu==0.0.42.*", "requests"],
    },
    entry_points={"console_scripts": ["xllava=xllava_jax.cli:main"]},
)
