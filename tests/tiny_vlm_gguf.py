"""A tiny random-weight vision-language model as GGUF plus mmproj, made by llama.cpp's own converter.

The converter (convert_hf_to_gguf.py, with its `conversion` package and gguf-py) ships in the llama-cpp-python
source distribution, at the version installed; it is fetched with pip once and kept in the test cache. The model
is an Idefics3 (SmolVLM's architecture) with a SentencePiece tokenizer trained here on a few lines of text: the
text half is written as a plain Llama folder and converted to the model GGUF, the vision half is converted with
`--mmproj`, as for a real SmolVLM.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# Tokens llama.cpp's Idefics3 image layout looks up by text, besides the image place itself.
SPECIAL = ["\n\n", "\n", "<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
           *[f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]]
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def converter(cache: Path) -> Path:
    """The folder holding llama.cpp's convert_hf_to_gguf.py for the installed llama-cpp-python."""
    version = metadata.version("llama-cpp-python")
    folder = cache / f"llama-converter-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, f"llama-cpp-python=={version}"], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                _, _, inner = member.name.partition("/vendor/llama.cpp/")
                if member.isfile() and inner and inner.startswith(WANTED):
                    target = staging / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    assert source is not None
                    target.write_bytes(source.read())
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging, partial)
        partial.rename(folder)
    return folder


def build(out: Path, cache: Path) -> tuple[str, str]:
    """Writes tiny-vlm.gguf and mmproj-tiny-vlm.gguf into `out`; returns their file names."""
    import sentencepiece as spm
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig, LlamaForCausalLM
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    work = out / "tiny-vlm-hf"
    text_dir = work / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    lines = ["the quick brown fox jumps over the lazy dog", "a red square on a white page",
             "what colour is this picture", "describe the image in one word", "User: hello Assistant: hi"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=SPECIAL,
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokenizer_config = json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                   "add_bos_token": True, "chat_template": TEMPLATE})
    for folder in (work, text_dir):
        (folder / "tokenizer.model").write_bytes(model.getvalue())
        (folder / "tokenizer_config.json").write_text(tokenizer_config)

    torch.manual_seed(0)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=64, patch_size=16)
    text = LlamaConfig(vocab_size=pieces.get_piece_size(), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                            image_token_id=pieces.piece_to_id("<image>"))
    vlm = Idefics3ForConditionalGeneration(config).eval()
    vlm.save_pretrained(work)
    (work / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Idefics3ImageProcessor", "size": {"longest_edge": 64},
         "max_image_size": {"longest_edge": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    language = LlamaForCausalLM(text).eval()
    language.model.load_state_dict(vlm.model.text_model.state_dict())
    language.lm_head.load_state_dict(vlm.lm_head.state_dict())
    language.save_pretrained(text_dir)

    script = converter(cache) / "convert_hf_to_gguf.py"
    names = ("tiny-vlm.gguf", "mmproj-tiny-vlm.gguf")
    for source, name, extra in ((text_dir, names[0], []), (work, names[1], ["--mmproj"])):
        subprocess.run([sys.executable, str(script), str(source), "--outfile", str(out / name), "--outtype", "f32",
                        *extra], check=True, capture_output=True)
    shutil.rmtree(work)
    return names
