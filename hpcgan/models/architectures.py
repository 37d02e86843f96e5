"""Imports every architecture family so its builders register in GENERATORS / CRITICS."""
from hpcgan.models import resnet  # noqa: F401
