"""Imports every architecture family so its builders register in GENERATORS / CRITICS.

  resnet: residual up/down-sampling generator and critic (WGAN-GP-AC, WGAN-GP, WGAN-GP-Info)
  dcgan:  conv-transpose generator and strided-conv critic (DCGAN, CGAN, AC-GAN, InfoGAN, WGAN)
"""
from hpcgan.models import dcgan, resnet  # noqa: F401
