"""A Stable Diffusion 1.5 with random weights, as stable-diffusion.cpp's own converter writes it: a Q4_0 GGUF.

stable-diffusion.cpp builds each model family at its real size and tells them apart by their tensors, so a toy
pipeline is not one it can run: this is the full SD 1.5 architecture (UNet 860M, CLIP-L 123M, VAE 84M
parameters), with small random weights, saved as a diffusers folder (the text encoder under Hugging Face's usual
names) and converted with stable-diffusion.cpp's `convert` to the Q4_0 GGUF that LocalAI's `stablediffusion`
installs (stable-diffusion-v1-5-pruned-emaonly-Q4_0.gguf). A second VAE, with other random weights, stands in
for a VAE given apart (`options: [vae_path:…]`). Both are made once and kept in the test cache (about 1.8 GB).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

GGUF = "sd15-random-q4_0.gguf"
OTHER_VAE = "sd15-random-other-vae.safetensors"
SD_TYPE_Q4_0 = 2


def _random(module, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim > 1:  # scaled by the fan-in, as PyTorch's own initialisation: activations keep their size
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in ** 0.5)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
        for name, buffer in module.named_buffers():
            if "position_ids" in name:
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
    vae.to_empty(device="cpu")
    _random(vae, seed)
    return vae.half()


def build(cache: Path) -> tuple[Path, Path]:
    """The GGUF and the second VAE, in the cache folder; made the first time."""
    folder = cache / "sd15-random"
    gguf, other_vae = folder / GGUF, folder / OTHER_VAE
    if gguf.is_file() and other_vae.is_file():
        return gguf, other_vae
    import stable_diffusion_cpp.stable_diffusion_cpp as sd_cpp
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        work = Path(tmp)
        with torch.device("meta"):
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                                projection_dim=768))
        for module, seed in ((unet, 1), (text, 2)):
            module.to_empty(device="cpu")
            _random(module, seed)
        unet.half().save_pretrained(work / "unet", safe_serialization=True)
        (work / "text_encoder").mkdir()
        save_file({f"text_model.{k}": v.contiguous() for k, v in text.half().state_dict().items()},
                  str(work / "text_encoder" / "model.safetensors"))
        _vae(3).save_pretrained(work / "vae", safe_serialization=True)
        partial = folder / f".{GGUF}.partial"
        if not sd_cpp.convert(str(work).encode(), b"", str(partial).encode(), SD_TYPE_Q4_0, b"", True):
            raise RuntimeError("stable-diffusion.cpp could not convert the random SD 1.5")
        partial.rename(gguf)
        _vae(4).save_pretrained(work / "other-vae", safe_serialization=True)
        shutil.copyfile(work / "other-vae" / "diffusion_pytorch_model.safetensors", other_vae)
    return gguf, other_vae
