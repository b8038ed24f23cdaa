"""mlsae: multi-layer sparse autoencoders on the residual stream (Lawson et al., ICLR 2025)."""

__version__ = "0.1.0"
