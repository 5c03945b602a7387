"""Image generation speed: seconds per step, diffusers in-process versus Hearth over HTTP, in one run.

    python benchmarks/images.py [--threads 2] [--steps 3] [--sizes 256 512]

The pipeline has Stable Diffusion 1.5's shape (UNet, VAE and CLIP text encoder at their real sizes) with random
weights: speed does not depend on the weights. It is built once and saved as a diffusers folder; diffusers runs
it in a fresh process (float32, DDIM, the same threads) and Hearth serves the same folder. Each measurement is one
image of --steps steps; seconds per step = (time - time of a 1-step image) / (steps - 1), so loading, text
encoding and VAE decoding fall out. The rounds alternate; medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import ROOT, machine_line, start_hearth, stop

BUILD = """
import json, sys, torch
from pathlib import Path
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
folder = Path(sys.argv[1])
torch.manual_seed(0)
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's UNet (the defaults)
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512, layers_per_block=2)
chars = list("abcdefghijklmnopqrstuvwxyz ")
vocab = {c: i for i, c in enumerate(chars)}
vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
scratch = folder.with_name("tokenizer-files"); scratch.mkdir()
(scratch / "vocab.json").write_text(json.dumps(vocab)); (scratch / "merges.txt").write_text("#version: 0.2\\n")
tokenizer = CLIPTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"), model_max_length=77)
text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                    num_hidden_layers=12, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                                    eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
"""

LOCAL = """
import json, sys, time, torch
from diffusers import DiffusionPipeline
folder, threads, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
def once(n):
    started = time.perf_counter()
    with torch.inference_mode():
        pipe("a lighthouse", num_inference_steps=n, height=size, width=size, generator=torch.Generator().manual_seed(1))
    return time.perf_counter() - started
once(1)
print(json.dumps([once(1), once(steps)]))
"""


def api_time(client: httpx.Client, size: int, steps: int) -> float:
    started = time.perf_counter()
    response = client.post("/v1/images/generations", json={"model": "sd15-shape", "prompt": "a lighthouse",
                                                           "size": f"{size}x{size}", "steps": steps, "seed": 1,
                                                           "response_format": "b64_json"})
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        subprocess.run([sys.executable, "-c", BUILD, str(models / "sd15-shape")], check=True)
        (models / "sd15-shape.yaml").write_text("name: sd15-shape\nbackend: diffusers\nparameters:\n"
                                                "  model: sd15-shape\n")
        process, base = start_hearth(models, args.threads)
        client = httpx.Client(base_url=base, timeout=3600)
        rows = []
        try:
            api_time(client, 64, 1)  # load
            for size in args.sizes:
                ours, theirs = [], []
                for _ in range(args.rounds):
                    one, many = api_time(client, size, 1), api_time(client, size, args.steps)
                    ours.append((many - one) / (args.steps - 1))
                    out = subprocess.run([sys.executable, "-c", LOCAL, str(models / "sd15-shape"), str(args.threads),
                                          str(size), str(args.steps)], capture_output=True, text=True, check=True)
                    one, many = json.loads(out.stdout.strip().splitlines()[-1])
                    theirs.append((many - one) / (args.steps - 1))
                rows.append((size, statistics.median(theirs), statistics.median(ours)))
        finally:
            client.close()
            stop(process)

    print(machine_line(threads=args.threads, steps=args.steps, rounds=args.rounds) + ", SD 1.5 shape, random weights, float32")
    print("| size | diffusers in-process s/step | Hearth over HTTP s/step | ratio (in-process / HTTP) |")
    print("|---|---|---|---|")
    for size, theirs, ours in rows:
        print(f"| {size}x{size} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
