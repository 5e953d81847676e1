"""Ray actors: stage (a block range of a DiT) and vae (a decoder); placement is set at creation."""
