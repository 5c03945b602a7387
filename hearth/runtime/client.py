"""A typed RPC client for one runner; gRPC failures come back as Hearth's own errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from hearth import errors
from hearth.runner import hearth_pb2 as pb
from hearth.runner import hearth_pb2_grpc as pb_grpc
from hearth.runner.server import MAX_MESSAGE_BYTES, SECRET_HEADER
from hearth.runner.wire import from_status


class RunnerGone(Exception):
    """The connection to the runner broke (it crashed, was killed, or was stopped)."""


def _translate(exc: aio.AioRpcError) -> Exception:
    typed = from_status(exc.details() or "", exc.trailing_metadata())
    if typed is not None:
        return typed
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                      grpc.StatusCode.INTERNAL):
        return RunnerGone(exc.details() or exc.code().name)
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return errors.ModelLoadFailed(f"the runner refused the connection: {exc.details()} (set HEARTH_RUNNER_SECRET "
                                      "to the runner's)")
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.ServiceUnavailable("the model runner did not answer in time")
    return errors.BackendError(f"runner error {exc.code().name}: {exc.details()}")


class RunnerClient:
    def __init__(self, address: str, secret: str = "") -> None:
        self.address = address
        self.metadata = ((SECRET_HEADER, secret),) if secret else None
        self.channel = aio.insecure_channel(
            address,
            options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        self.stub = pb_grpc.RunnerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self.metadata)
        except aio.AioRpcError as exc:
            raise _translate(exc) from None

    async def health(self, timeout: float = 5.0) -> pb.HealthReply:
        return await self._unary(self.stub.Health, pb.HealthRequest(), timeout)

    async def load(self, request: pb.LoadRequest, timeout: float) -> pb.ModelInfo:
        return await self._unary(self.stub.Load, request, timeout)

    async def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        reply = await self._unary(self.stub.Tokenize,
                                  pb.TokenizeRequest(text=text, add_special=add_special, parse_special=parse_special))
        return list(reply.tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._unary(self.stub.Detokenize, pb.DetokenizeRequest(tokens=tokens))).text

    async def embed(self, request: pb.EmbedRequest) -> pb.EmbedReply:
        return await self._unary(self.stub.Embed, request)

    async def rerank(self, request: pb.RerankRequest) -> pb.RerankReply:
        return await self._unary(self.stub.Rerank, request)

    async def detect_speech(self, request: pb.VadRequest) -> pb.VadReply:
        return await self._unary(self.stub.DetectSpeech, request)

    async def transcribe(self, request: pb.TranscribeRequest) -> AsyncIterator[pb.TranscribeReply]:
        async for reply in self._stream(self.stub.Transcribe(request, metadata=self.metadata)):
            yield reply

    async def speak(self, request: pb.SpeakRequest) -> AsyncIterator[pb.SpeakReply]:
        async for reply in self._stream(self.stub.Speak(request, metadata=self.metadata)):
            yield reply

    async def generate_image(self, request: pb.ImageRequest) -> AsyncIterator[pb.ImageReply]:
        async for reply in self._stream(self.stub.GenerateImage(request, metadata=self.metadata)):
            yield reply

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateReply]:
        async for reply in self._stream(self.stub.Generate(request, metadata=self.metadata)):
            yield reply

    async def _stream(self, call: Any) -> AsyncIterator[Any]:
        try:
            async for reply in call:
                yield reply
        except aio.AioRpcError as exc:
            raise _translate(exc) from None
        finally:
            # Leaving early (client gone, error) tells the runner to stop generating.
            call.cancel()
