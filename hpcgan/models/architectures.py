"""Imports every architecture family so its builders register in hpcgan.models.builders' GENERATORS / CRITICS.

  resnet: residual up/down-sampling generator and critic (WGAN-GP-AC, WGAN-GP, WGAN-GP-Info); the
          conditional-batch-norm generator resnet_cbn and the sum-pooled ReLU critic sngan (SNGAN-projection)
  dcgan:  conv-transpose generator and strided-conv critic (DCGAN, CGAN, AC-GAN, InfoGAN, WGAN)
"""
from hpcgan.models import dcgan, resnet  # noqa: F401
