"""GAN architectures. One registry (registry.py); one small file per family."""
from hpcgan.models.registry import GANSpec, build_model, MODEL_NAMES  # noqa: F401
