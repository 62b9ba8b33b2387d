"""Probes on the token labels (pipeline/label): what the activations, the SAEs' reconstructions and their latents
say about the reasoning's structure."""
