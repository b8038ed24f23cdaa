"""GPU speed (issue 22): a sync-free SAE step, sorted sparse gradients, Triton kernels, SDPA.

Nothing in the default pipeline imports this package: the CPU trainer (`mlsae.train`,
`mlsae.sae`) keeps its path, and DVC's stages do not depend on these files
(`mlsae.stagedeps`). Each piece has a CPU reference and is tested against it or against a dense
float64 computation; the Triton kernels are tested under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
