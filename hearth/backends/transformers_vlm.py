"""Hugging Face transformers folders on the CPU build of torch: image-text-to-text models (LLaVA, Idefics3/SmolVLM,
Qwen2-VL, ...) with their processor, and plain causal language models.

The chat template is the processor's own (sent to the API process, which renders it, with image places as
`{"type": "image"}` parts); the processor expands each image place into the model's image tokens, so `usage`
counts them. One request runs at a time. No grammars: forced tool calls and response formats need llama-cpp
(a lazy grammar for tool_choice auto is skipped: calls are still parsed). No logprobs.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hearth.backends.base import Backend as BaseBackend
from hearth.backends.base import GenerationChunk, GenerationSpec, LoadSpec, ModelDescription, StopBuffer, need
from hearth.cores import Share, follow_in_torch
from hearth.errors import ContextLengthExceeded, InvalidRequest, ModelLoadFailed


class Backend(BaseBackend):
    name = "transformers"

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        self.vision = False
        self.context = 2048
        self._lock = threading.Lock()
        self.share = Share(1)

    def load(self, spec: LoadSpec) -> ModelDescription:
        folder = Path(spec.model_path)
        if not (folder / "config.json").is_file():
            raise ModelLoadFailed(f"{folder.name} is not a Hugging Face model folder (no config.json in it)")
        torch, transformers = need("torch", "torch", "transformers", why="the transformers backend")
        torch.set_num_threads(spec.threads)
        self.share = spec.share()
        try:
            try:
                self.model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
                self.vision = True
            except ValueError:  # not an image-text-to-text architecture: a plain language model
                self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.model.eval()
            self.processor = transformers.AutoProcessor.from_pretrained(folder)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadFailed(f"transformers could not load {folder.name}: {exc}") from None
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context = int(spec.context_size or getattr(text_config, "max_position_embeddings", 0) or 2048)
        capabilities = ["generate", "tokenize"] + (["chat"] if template else []) + (["vision"] if self.vision else [])
        return ModelDescription(
            backend=self.name, capabilities=capabilities, context_size=self.context,
            train_context_size=int(getattr(text_config, "max_position_embeddings", 0) or 0),
            chat_template=template or "", bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "", add_bos=False,
            architecture=str(getattr(config, "model_type", "")),
            parameter_count=int(sum(p.numel() for p in self.model.parameters())), parallel=1,
            metadata={"engine": "torch"})

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        if any(not 0 <= t < len(self.tokenizer) for t in tokens):
            raise InvalidRequest(f"token ids must be between 0 and {len(self.tokenizer) - 1}", param="tokens")
        return self.tokenizer.decode(tokens)

    def _inputs(self, spec: GenerationSpec) -> Any:
        from PIL import Image, UnidentifiedImageError

        if spec.suffix is not None:
            raise InvalidRequest("this model has no fill-in-the-middle support, so 'suffix' is not supported",
                                 param="suffix")
        if spec.prompt_tokens is not None:
            raise InvalidRequest("this backend takes text prompts, not token ids", param="prompt")
        images = []
        for data in spec.images:
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise InvalidRequest(f"an image could not be read: {exc}", param="messages") from None
        if images and not self.vision:
            raise InvalidRequest("this model does not accept images", param="messages")
        try:
            if self.vision:
                return self.processor(text=[spec.prompt or ""], images=images or None, return_tensors="pt")
            return self.tokenizer([spec.prompt or ""], return_tensors="pt")
        except ValueError as exc:  # e.g. images and image places in the prompt do not match
            raise InvalidRequest(f"the model's processor refused the input: {exc}", param="messages") from None

    def generate(self, spec: GenerationSpec, cancelled: Callable[[], bool]) -> Iterator[GenerationChunk]:
        import time

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        if spec.logprobs:
            raise InvalidRequest("logprobs are not available with the transformers backend", param="logprobs")
        if spec.sampling.grammar and not spec.sampling.grammar_triggers:
            raise InvalidRequest("grammars (response_format, forced tool calls, grammar) need the llama-cpp backend",
                                 param="response_format")
        with self._lock:
            started = time.perf_counter()
            inputs = self._inputs(spec)
            n_prompt = int(inputs["input_ids"].shape[1])
            room = self.context - n_prompt
            if room <= 0 or (spec.max_tokens and spec.max_tokens > room):
                raise ContextLengthExceeded(
                    f"the prompt is {n_prompt} tokens (images included) and {spec.max_tokens or 1} more were "
                    f"requested, but the model's context is {self.context} tokens", param="max_tokens")
            stops = StopBuffer(spec.stop)
            hit = threading.Event()

            class Stop(StoppingCriteria):
                def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                    follow_in_torch(share, torch)  # after each token: other models may have started or stopped
                    return hit.is_set() or cancelled()

            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            s = spec.sampling
            temperature = 0.8 if s.temperature is None else s.temperature
            options: dict[str, Any] = {"max_new_tokens": spec.max_tokens or room, "streamer": streamer,
                                       "stopping_criteria": StoppingCriteriaList([Stop()]),
                                       "do_sample": temperature > 0, "pad_token_id": self.tokenizer.pad_token_id}
            if temperature > 0:
                options.update(temperature=temperature, top_p=0.95 if s.top_p is None else s.top_p,
                               top_k=40 if s.top_k is None else s.top_k)
            if s.repeat_penalty is not None and s.repeat_penalty != 1.0:
                options["repetition_penalty"] = s.repeat_penalty
            if spec.ignore_eos:
                options["min_new_tokens"] = options["max_new_tokens"]
            result: dict[str, Any] = {}

            share = self.share

            def run() -> None:
                try:
                    follow_in_torch(share, torch)
                    if s.seed is not None:
                        torch.manual_seed(s.seed)
                    with torch.inference_mode():
                        result["output"] = self.model.generate(**inputs, **options)
                except BaseException as exc:  # handed to the reader below
                    result["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=run, name="transformers-generate", daemon=True)
            worker.start()
            first = 0.0
            for piece in streamer:
                first = first or time.perf_counter()
                if hit.is_set():
                    continue
                text, stopped = stops.push(piece)
                if text:
                    yield GenerationChunk(text=text, token_count=1)
                if stopped:
                    hit.set()
            worker.join()
            if "error" in result:
                raise result["error"]
            if cancelled():
                return
            if not hit.is_set():
                tail = stops.flush()
                if tail:
                    yield GenerationChunk(text=tail)
            produced = int(result["output"].shape[1]) - n_prompt
            finish = "stop" if hit.is_set() or produced < options["max_new_tokens"] else "length"
            now = time.perf_counter()
            first = first or now
            yield GenerationChunk(finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=produced,
                                  prompt_ms=(first - started) * 1000, predicted_ms=(now - first) * 1000)
