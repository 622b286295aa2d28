"""ntkrun: reproduce and extend the Neural Tangent Kernel experiments of Jacot et al. (2018)."""

__version__ = "0.1.0"
