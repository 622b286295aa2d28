"""Network architectures: one description per architecture gives the finite network, its limiting
kernels and its cost (`ntkrun.architectures.base`, `ntkrun.architectures.registry.describe`;
docs/science.md §9 for the CNN). The package itself holds only the networks' modules:

    from ntkrun.architectures import CNN
"""

from ntkrun.architectures.cnn import CNN

__all__ = ["CNN"]
