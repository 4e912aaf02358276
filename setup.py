"""Installs mixco_tf, the Keras 3 / TensorFlow implementation of MixCo."""

import pathlib

import setuptools

README = pathlib.Path(__file__).parent / "README.md"

setuptools.setup(
    name="mixco-tf",
    version="0.1.0",
    description="MixCo: mix-up contrastive learning on MoCo-v2, in Keras 3 / TensorFlow",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["mixco_tf", "mixco_tf.*"]),
    install_requires=[
        "keras>=3.3",
        "absl-py>=1.0",
        "numpy>=1.23",
        "PyYAML>=6.0",
        "scikit-learn>=1.2",
        "tensorboard>=2.16",
        "tensorflow-datasets>=4.9",
        # Decodes CMYK JPEGs and checks image files before training (mixco_tf.data.decode).
        "Pillow>=9.1",
        # TFDS 4.9 imports it when preparing any builder but declares it only for Python < 3.9.
        "importlib_resources>=5.0",
        "requests>=2.19",
        "threadpoolctl>=2.0",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        # Plots, the augmentation preview and examples/quickstart.ipynb.
        "notebook": ["matplotlib>=3.6", "ipykernel>=6.0"],
        # The run plots and compare's capacity plot, without the notebook kernel.
        "plots": ["matplotlib>=3.6"],
        # tensorflow-serving-api requires the `tensorflow` distribution; next to
        # tensorflow-cpu install it with `pip install --no-deps tensorflow-serving-api`.
        "serving": ["tensorflow-serving-api>=2.16", "requests>=2.0"],
        "onnx": ["tf2onnx>=1.16", "onnx>=1.14", "onnxruntime>=1.16"],
        "tune": ["keras-tuner>=1.4"],
        # Every optional feature but serving, so that the suite tests them.
        "test": [
            "pytest>=7.0",
            "pytest-xdist>=3.0",
            "matplotlib>=3.6",
            "ipykernel>=6.0",
            "nbclient>=0.6",
            "nbformat>=5.1",
            "keras-tuner>=1.4",
            "tf2onnx>=1.16",
            "onnx>=1.14",
            "onnxruntime>=1.16",
        ],
    },
    entry_points={
        "console_scripts": [
            "mixco-train=mixco_tf.train:run",
            "mixco-linear-eval=mixco_tf.linear_eval:run",
            "mixco-export=mixco_tf.export:run",
            "mixco-tune=mixco_tf.tune:run",
            "mixco-preview=mixco_tf.preview:run",
            "mixco-compare=mixco_tf.compare:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
