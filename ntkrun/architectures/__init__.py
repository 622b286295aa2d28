"""Network architectures beyond the fully connected `ntkrun.MLP` (docs/science.md §9).

from ntkrun.architectures import CNN
"""

from ntkrun.architectures.cnn import CNN

__all__ = ["CNN"]
