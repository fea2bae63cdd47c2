"""Background refinements of tasks' adapters: one at a time, a bounded queue, status kept in the task record.

``reserve`` a place before registering a task (False: the queue is full, answer 429), then ``submit`` the job or
``release`` the place. The worker marks the task's refinement ``running``, refines through
``AdapterService.refined`` (cached and regenerable like any adapter), and records ``done`` with the refined adapter's
self-check, or ``failed`` with the reason; the generated adapter stays in place either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from generator.refine import RefinePlan
from generator.tasks import TaskSpec
from service.adapters import AdapterService
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.selfcheck import check_of
from service.task_store import Refinement, TaskRecord, TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineJob:
    """``record``: the task registration whose status it keeps (a re-created task of the same id is another one);
    None for an ad-hoc adapter (``POST /v1/adapters``), whose refinement only fills the caches."""

    spec: TaskSpec
    seed: int | None
    plan: RefinePlan
    adapter_id: str  # the refined adapter's content address
    record: TaskRecord | None = None


def _reason(exc: BaseException) -> str:
    message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
    return message[:500]


class RefinementQueue:
    def __init__(self, adapters: AdapterService, store: TaskStore, metrics: ServiceMetrics, capacity: int) -> None:
        self.adapters = adapters
        self.store = store
        self.metrics = metrics
        self.capacity = capacity
        self._queue: asyncio.Queue[RefineJob] = asyncio.Queue()
        self._reserved = 0
        self._worker: asyncio.Task[None] | None = None
        self._tracked: set[str] = set()  # task ids whose refinement this process has queued or is running

    def tracks(self, task_id: str) -> bool:
        """Whether this process queued (and has not finished) the task's refinement. A ``queued`` or ``running``
        status nobody tracks was left by a restart (or is another replica's): asking again re-queues it, which is
        harmless since refinements are deterministic and content-addressed."""
        return task_id in self._tracked

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + self._reserved

    def reserve(self) -> bool:
        """Hold a place for one job; False when ``capacity`` jobs wait already (counted as ``rejected``)."""
        if self.waiting >= self.capacity:
            self.metrics.refinements.labels("rejected").inc()
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        self._reserved -= 1

    def submit(self, job: RefineJob) -> None:
        """Queue a job in a place held by ``reserve``."""
        self._reserved -= 1
        self._queue.put_nowait(job)
        if job.record is not None:
            self._tracked.add(job.record.task_id)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="icm-lora-refinements")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._process(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is down: the job's status cannot be recorded; go on with the next one
                log.exception("refinement %s could not be recorded", job.adapter_id)
            finally:
                if job.record is not None:
                    self._tracked.discard(job.record.task_id)

    async def _record(self, job: RefineJob, refinement: Refinement) -> bool:
        return True if job.record is None else await self.store.update_refinement(job.record, refinement)

    async def _process(self, job: RefineJob) -> None:
        steps = job.plan.steps
        if not await self._record(job, Refinement("running", steps, job.adapter_id)):
            return  # the task was deleted meanwhile
        try:
            parent, _ = await self.adapters.get_or_generate(job.spec, job.seed)
            refined, _ = await self.adapters.refined(parent, job.spec, job.seed, job.plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("refinement %s failed: %s", job.adapter_id, exc)
            self.metrics.refinements.labels("failed").inc()
            await self._record(job, Refinement("failed", steps, job.adapter_id, _reason(exc)))
            return
        self.metrics.refinements.labels("done").inc()
        await self._record(job, Refinement("done", steps, refined.adapter_id, None, check_of(refined)))
