"""A test-only ComfyUI node: LATENT -> IMAGE without a VAE (first 3 channels, sigmoid, nearest upscale),
so that a diffusion prompt of the tests ends in SaveImage with no VAE model.  Loaded by the test
frontends and workers from ``tests/comfy/worker_nodes``; not part of mesh-ray."""

import torch
import torch.nn.functional as F


class MeshTestLatentToImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "scale": ("INT", {"default": 16, "min": 1, "max": 64})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "testing"

    def convert(self, samples, scale):
        x = torch.sigmoid(samples["samples"][:, :3].float())
        return (F.interpolate(x, scale_factor=scale, mode="nearest").permute(0, 2, 3, 1).contiguous(),)


NODE_CLASS_MAPPINGS = {"MeshTestLatentToImage": MeshTestLatentToImage}
