"""Synthetic activations with known features (after SynthSAEBench), for the ground-truth benchmark."""
