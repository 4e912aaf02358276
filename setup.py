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
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": ["pytest>=7.0"],
        "plots": ["matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "mixco-train=mixco_tf.train:run",
            "mixco-linear-eval=mixco_tf.linear_eval:run",
            "mixco-export=mixco_tf.export:run",
            "mixco-compare=mixco_tf.compare:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
