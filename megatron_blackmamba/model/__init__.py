"""BlackMamba on megatron-core: Mamba-1 mixer, Sinkhorn router, stack spec, model builder."""
