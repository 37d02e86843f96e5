"""hpcgan: class-conditional GANs for bone-marrow and blood cell images on Slurm clusters."""
from pathlib import Path

__version__ = "0.1.0"

# configs/ lives beside the package in the checkout (the package is installed editable).
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
