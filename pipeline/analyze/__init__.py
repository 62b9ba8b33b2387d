"""What each latent learned: streamed statistics over a split, direct logit effects, a static feature browser."""
