"""Decoders on other GPUs: the decoder pool (``service``) and its deferred results (``promise``).
The public names (``VaeService``, ``Promise``, ``save_promised``) are on ``mesh_ray``."""
