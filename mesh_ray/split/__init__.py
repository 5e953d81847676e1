"""The split model: a DiT's blocks over stage actors, and what drives it.

``model`` (SplitModel: stages, links, a step through them), ``recovery`` (stage restart, step
retry), ``sampler`` / ``pipeline`` (one image / many images in flight), ``plan`` / ``planner`` /
``probing`` (block ranges for mismatched devices), ``patch_args`` (ComfyUI's block-patch
arguments), ``lora`` (LoRAs shipped to the stages).  The public names are on ``mesh_ray``.
"""
