"""The batched model loop: windows of many attempts per forward pass."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from runner.attempt import Attempt
from runner.embed import Embedder, WindowBatcher, WindowItem
from runner.errors import EmbedError, EmbedOutOfMemoryError
from runner.metrics import Metrics
from runner.stages.decoder import Decoded
from runner.stages.inflight import Inflight

log = logging.getLogger(__name__)


#: videos failed alone one after another, with no window embedded in between: past
#: this the model or its device is broken (a CUDA error poisons every later call),
#: and failing the whole catalogue one video at a time would be worse than stopping
MAX_FAILED_ALONE_IN_A_ROW = 8


class ModelBroken(RuntimeError):
    """Every video fails alone: the embed stage stops the daemon instead."""


def model_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that owns the model: the daemon loads it there and the embed
    loop runs it there (CUDA state and allocator caches stay with one thread)."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="runner-embed")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class EmbedLoop:
    """Exactly one thread owns the model; this loop feeds it batches.

    A batch that fails is not the fault of every video in it: it is split, each
    video's windows are tried on their own, and only a video that fails alone
    fails.  Running out of device memory is nobody's fault: the batch budget is
    halved for the rest of the run and the batch is tried again in halves; only a
    single window that still does not fit fails its video, as a transient error.
    """

    def __init__(
        self,
        embedder: Embedder,
        queue_in: asyncio.Queue[WindowItem | Decoded],
        inflight: Inflight,
        metrics: Metrics,
        *,
        batch_seconds: float,
        thread: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.embedder, self.queue_in, self.inflight, self.metrics = (
            embedder,
            queue_in,
            inflight,
            metrics,
        )
        self.batcher = WindowBatcher(embedder, batch_seconds)
        spec = getattr(embedder, "spec", None)  # test doubles may wrap no real model
        #: recorded on every result: how its vector was made (runner/spec.py)
        self.spec_id: str | None = spec.id if spec is not None else None
        self.failed_alone_in_a_row = 0
        self._model = thread or model_thread()

    async def run(self) -> None:
        while True:
            if not self.batcher.pending:
                self._accept(await self.queue_in.get())
            while not self.queue_in.empty() and not self.batcher.full:
                self._accept(self.queue_in.get_nowait())
            batch = self.batcher.next_batch()
            if batch:
                await self._embed(batch)

    def _accept(self, item: WindowItem | Decoded) -> None:
        if isinstance(item, WindowItem):
            if item.owner.live:
                self.batcher.add(item)
            return
        attempt = item.attempt
        if not attempt.live:
            return
        if item.error is not None:
            self.inflight.error(attempt, item.error)
            return
        attempt.decoded(item.windows, item.info)
        self._maybe_complete(attempt)

    async def _embed(self, batch: Sequence[WindowItem]) -> None:
        batch = [item for item in batch if item.owner.live]
        if not batch:
            return
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            parts = await loop.run_in_executor(
                self._model, self.embedder.embed, [item.samples for item in batch]
            )
        except Exception as exc:  # one bad batch must not stop the daemon, nor fail others
            await self._split(batch, exc)
            return
        finally:
            self.metrics.embedded(time.monotonic() - started)
        self.failed_alone_in_a_row = 0
        for item, part in zip(batch, parts, strict=True):
            attempt: Attempt = item.owner
            if attempt.live:
                attempt.add_part(part)
                self._maybe_complete(attempt)

    async def _split(self, batch: Sequence[WindowItem], exc: Exception) -> None:
        oom = is_out_of_memory(exc)
        if oom and self.batcher.shrink():
            log.warning(
                "out of memory on a batch of %d windows: batch budget halved to %.0f s",
                len(batch),
                self.batcher.budget_samples / 16_000,
            )
        owners = list(dict.fromkeys(item.owner for item in batch))
        if len(owners) > 1:  # each video on its own
            for owner in owners:
                await self._embed([item for item in batch if item.owner is owner])
            return
        if oom and len(batch) > 1:  # one video, too much at once: halves
            middle = len(batch) // 2
            await self._embed(batch[:middle])
            await self._embed(batch[middle:])
            return
        attempt: Attempt = owners[0]
        log.warning("embedding job %s failed alone: %s", attempt.job.key, exc)
        error_type = EmbedOutOfMemoryError if oom else EmbedError
        self.inflight.error(attempt, error_type(f"embedding failed: {exc}"))
        self.failed_alone_in_a_row += 1
        if self.failed_alone_in_a_row >= MAX_FAILED_ALONE_IN_A_ROW:
            raise ModelBroken(
                f"{self.failed_alone_in_a_row} videos in a row failed alone in the model "
                f"(last: {exc}); stopping rather than failing the whole catalogue"
            ) from exc

    def _maybe_complete(self, attempt: Attempt) -> None:
        if not (attempt.live and attempt.complete):
            return
        result = attempt.result(self.embedder.model_id, self.spec_id)
        if not np.isfinite(result.vector).all():  # a float16 overflow, a broken model
            self.inflight.error(
                attempt,
                EmbedError(
                    "the embedding is not finite (NaN or Inf; a float16 overflow? "
                    "try --dtype float32 or bfloat16)"
                ),
            )
            return
        self.inflight.succeed(attempt, result)

    def shutdown(self) -> None:
        self._model.shutdown()
