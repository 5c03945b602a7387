"""The one internal entry point the API adapters share: resolve a model, get its runner, run a capability."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from hearth.config.loader import ModelRegistry
from hearth.config.schema import ModelConfig
from hearth.errors import CapabilityNotSupported, HearthError
from hearth.gallery.jobs import Jobs
from hearth.runner import hearth_pb2 as pb
from hearth.runtime.manager import Runner, RunnerManager
from hearth.settings import Settings

log = logging.getLogger("hearth.engine")


class Engine:
    """Models directory + runners: what every serving function is given."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models_dir)
        self.jobs = Jobs()  # installs in the background, and a cluster's installs on its nodes
        self.runners = RunnerManager(settings, self.jobs)
        self.ready = False
        self.preload_errors: dict[str, str] = {}

    async def start(self) -> None:
        self.registry.refresh(force=True)
        await self.runners.start()

    async def preload(self) -> None:
        for name in self.settings.preload:
            try:
                await self.load(self.registry.get(name))
            except HearthError as exc:
                self.preload_errors[name] = exc.message
                log.error("preloading '%s' failed: %s", name, exc.message)
        self.ready = True

    async def load(self, config: ModelConfig) -> list[Runner]:
        """The model's runner, loaded; a realtime pipeline's parts' runners (it has none of its own)."""
        if config.pipeline is None:
            return [await self.runners.ensure_loaded(config)]
        return [await self.runners.ensure_loaded(self.model(part)) for part in config.pipeline.parts()]

    async def stop(self) -> None:
        await self.runners.shutdown()

    def model(self, name: str) -> ModelConfig:
        return self.registry.get(name)

    @contextlib.asynccontextmanager
    async def runner(self, config: ModelConfig, capability: str, affinity: list[str] | None = None
                     ) -> AsyncIterator[Runner]:
        """The model's ready runner, after checking the loaded model really has `capability`; of several replicas,
        preferably one that served a prompt beginning with the same parts as `affinity` (see RunnerManager.use)."""
        if config.pipeline is not None:
            raise CapabilityNotSupported(f"model '{config.name}' is a realtime pipeline: it is served on "
                                         "/v1/realtime (WebSocket), not here", param="model")
        async with self.runners.use(config, computes=capability != "tokenize", affinity=affinity) as runner:
            assert runner.info is not None
            if capability not in runner.info.capabilities:
                raise CapabilityNotSupported(_missing_capability(config.name, capability, runner.info),
                                             param="model")
            yield runner


def _missing_capability(name: str, capability: str, info: pb.ModelInfo) -> str:
    has = ", ".join(info.capabilities) or "nothing"
    return f"model '{name}' ({info.backend}) does not support {capability}; it supports: {has}"
