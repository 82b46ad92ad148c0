"""Fact-parallel execution: one process, or long-lived Ray actors that load the model once and take facts.

A job gives ``map_facts`` a *task*: ``setup()`` builds what every fact needs (model, unit sets) once
per process, ``run(context, fact)`` returns one fact's JSON-able row. Rows are appended to a journal
beside the output as they finish (``--resume`` skips the facts already there), re-ordered by fact, so
the merged result is the single-process one. A Ray worker that dies is replaced and its facts
re-queued; a fact that fails twice is reported with its error and the job still finishes. Without
``--workers``/``--ray-address`` nothing of Ray is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kscope.config import Config, option
from kscope.errors import KscopeError
from kscope.io import write_text
from kscope.net import reachable
from kscope.outputs import journal_path
from kscope.progress import note


@dataclass
class ParallelConfig(Config):
    """Where the per-fact work runs, and resuming it."""

    workers: int | None = option(None, "Run the per-fact work on N Ray workers of a local cluster (pip install 'kscope[ray]').", min=1)
    ray_address: str | None = option(None, "Join an existing Ray cluster at this address (host:port) instead.")
    gpus_per_worker: float = option(0.0, "GPUs each Ray worker reserves.", min=0.0)
    threads_per_worker: int = option(1, "torch threads in each Ray worker.", min=1)
    resume: bool = option(False, "Skip the facts already in the journal beside the output (from an interrupted run with the same options).")

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.ray_address is not None

    def validate(self) -> None:
        """Refusals that need no model: Ray installed, the cluster reachable, the GPUs there."""
        if not self.distributed:
            if self.gpus_per_worker:
                raise KscopeError(f"--gpus-per-worker {self.gpus_per_worker:g} needs --workers or --ray-address (without them "
                                  "everything runs in this process, on --device)")
            return
        try:
            import ray  # noqa: F401
        except ImportError:
            raise KscopeError("--workers / --ray-address need Ray: pip install 'kscope[ray]'") from None
        if self.ray_address:
            host, _, port = self.ray_address.replace("ray://", "").rpartition(":")
            if not host or not port.isdigit():
                raise KscopeError(f"--ray-address {self.ray_address!r}: give host:port")
            if not reachable(host, int(port)):
                raise KscopeError(f"--ray-address {self.ray_address}: no Ray cluster answers there")
        elif self.gpus_per_worker:
            import torch

            need = self.gpus_per_worker * (self.workers or 1)
            if need > torch.cuda.device_count():
                raise KscopeError(f"--gpus-per-worker {self.gpus_per_worker:g} x {self.workers} workers needs {need:g} GPUs; "
                                  f"this machine has {torch.cuda.device_count()}")


@dataclass
class FactTask:
    """What a job does per fact. ``setup`` runs once per process; ``run(context, fact)`` -> a JSON-able row.
    Both must be picklable (module-level functions), as must ``args``."""

    setup: Callable[..., Any]
    run: Callable[[Any, Any], Any]
    args: tuple = ()


def fact_task(parallel: ParallelConfig, run: Callable[[Any, Any], Any], local_context: Any, remote_setup: Callable[..., Any],
              remote_args: tuple) -> FactTask:
    """One process reuses the context the job already built; Ray workers build theirs with ``remote_setup(*remote_args)``."""
    if parallel.distributed:
        return FactTask(remote_setup, run, remote_args)
    return FactTask(lambda: local_context, run)


def fact_keys(facts: Sequence[Any]) -> list[str]:
    """Journal keys: position and uid (uids alone may repeat)."""
    return [f"{i}:{f.uid}" for i, f in enumerate(facts)]


@dataclass
class Outcome:
    """Rows in fact order (None for a fact that failed), the failures, and where the time went."""

    rows: list[Any]
    failed: list[dict] = field(default_factory=list)
    per_worker: dict[str, dict] = field(default_factory=dict)
    resumed: int = 0


def _fingerprint(fingerprint_of: Any) -> str:
    return hashlib.sha256(json.dumps(fingerprint_of, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """Per-fact rows appended as they finish; line 1 holds the fingerprint of the options that made them.

    Each row is one ``write`` of a whole line, fsynced; a write that fails (a full disk) is cut back to the last whole
    line, so the journal stays one that ``--resume`` reads."""

    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path, self.fingerprint = path, fingerprint
        self.done: dict[str, Any] = {}
        if resume and path.exists():
            size = self._read()
        else:
            size = write_text(path, json.dumps({"fingerprint": fingerprint}) + "\n").stat().st_size  # atomic: whole or absent
        self._fd = os.open(path, os.O_WRONLY)
        os.ftruncate(self._fd, size)  # a row cut by an interruption goes: its fact runs again
        self._size = size

    def _read(self) -> int:
        """Rows of a journal to resume; the size of its whole lines. A line that is not the journal's own is refused
        with its number; a last line cut by the interruption is dropped with a note."""
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")
        for n, raw in enumerate(lines, 1):
            try:
                rec = json.loads(raw.decode("utf-8"))
            except ValueError as e:  # UnicodeDecodeError too
                raise KscopeError(f"{self.path}:{n}: not a journal line ({type(e).__name__}); delete the journal to start "
                                  "over, or drop --resume") from None
            if n == 1 and not (isinstance(rec, dict) and "fingerprint" in rec):
                raise KscopeError(f"{self.path}:1: not a kscope journal (no fingerprint); delete it or drop --resume")
            if n == 1 and rec["fingerprint"] != self.fingerprint:
                raise KscopeError(f"{self.path} was written with other options; drop --resume or delete it")
            if n > 1:
                if not (isinstance(rec, dict) and isinstance(rec.get("key"), str) and "row" in rec):
                    raise KscopeError(f"{self.path}:{n}: not a journal row (expected an object with key and row); delete the "
                                      "journal to start over, or drop --resume")
                self.done[rec["key"]] = rec["row"]
        if not lines:
            raise KscopeError(f"{self.path}:1: not a kscope journal (no whole first line); delete it or drop --resume")
        if tail:
            note(f"{self.path}:{len(lines) + 1}: a row cut by the interruption is dropped; its fact runs again")
        return len(data) - len(tail)

    def add(self, key: str, row: Any) -> None:
        data = (json.dumps({"key": key, "row": row}) + "\n").encode()
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        self._size += len(data)
        self.done[key] = row

    def close(self, remove: bool) -> None:
        os.close(self._fd)
        if remove:
            self.path.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    """``data`` at the end of the file behind ``fd`` (a short write continues, an error raises)."""
    os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _die_for_tests(n_done: int) -> None:
    """``KSCOPE_TEST_DIE_AFTER=N``: the driver exits hard after journaling N facts (the resume tests use it)."""
    n = os.environ.get("KSCOPE_TEST_DIE_AFTER")
    if n is not None and n_done >= int(n):
        os._exit(17)


def map_facts(task: FactTask, facts: Sequence[Any], keys: Sequence[str], cfg: ParallelConfig, out: str | Path,
              fingerprint_of: Any, progress=None, label: str = "facts") -> Outcome:
    """``task.run`` on every fact, locally or on Ray workers; journaled beside ``out``; rows back in fact order."""
    journal = Journal(journal_path(out), _fingerprint(fingerprint_of), cfg.resume)
    todo = [i for i, k in enumerate(keys) if k not in journal.done]
    resumed = len(facts) - len(todo)
    bar = progress.add_task(f"{label} ({cfg.workers or 'cluster'} workers)" if cfg.distributed else label, total=len(facts),
                            completed=resumed) if progress else None
    failed: list[dict] = []
    per_worker: dict[str, dict] = {}
    try:
        if cfg.distributed:
            _run_ray(task, facts, keys, todo, cfg, journal, failed, per_worker, progress, bar)
        else:
            ctx = task.setup(*task.args) if todo else None
            t0 = time.time()
            for n, i in enumerate(todo, 1):
                row, err = None, None
                for _ in range(2):
                    try:
                        row = task.run(ctx, facts[i])
                        break
                    except KscopeError:
                        raise
                    except Exception as e:  # noqa: BLE001 - recorded, the job goes on
                        err = f"{type(e).__name__}: {e}"
                if err is not None and row is None:
                    failed.append({"key": keys[i], "error": err})
                else:
                    journal.add(keys[i], row)
                if progress:
                    progress.advance(bar)
                _die_for_tests(n)
            per_worker["local"] = {"facts": len(todo), "seconds": time.time() - t0}
    except BaseException:
        journal.close(remove=False)
        raise
    rows = [journal.done.get(k) for k in keys]
    journal.close(remove=not failed)
    return Outcome(rows, failed, per_worker, resumed)


def _run_ray(task, facts, keys, todo, cfg: ParallelConfig, journal: Journal, failed, per_worker, progress, bar) -> None:
    import ray

    if not ray.is_initialized():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False, ignore_reinit_error=True)
        else:
            ray.init(num_cpus=cfg.workers * cfg.threads_per_worker, num_gpus=int(cfg.gpus_per_worker * cfg.workers + 0.999),
                     include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

    @ray.remote(num_cpus=cfg.threads_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=0)
    class Worker:
        def __init__(self, threads: int):
            import torch

            torch.set_num_threads(threads)
            self.ctx = task.setup(*task.args)

        def run(self, fact):
            t = time.time()
            try:
                return task.run(self.ctx, fact), None, time.time() - t
            except Exception as e:  # noqa: BLE001
                return None, f"{type(e).__name__}: {e}", time.time() - t

    n_workers = cfg.workers or max(1, int(ray.available_resources().get("CPU", 1) // cfg.threads_per_worker))
    workers = {w: Worker.remote(cfg.threads_per_worker) for w in range(min(n_workers, len(todo)) or 0)}
    queue = list(todo)
    attempts: dict[int, int] = {}
    inflight: dict[Any, tuple[int, int]] = {}  # ref -> (worker id, fact index)
    next_id = len(workers)
    done_n = 0

    def submit(w: int) -> None:
        if queue:
            i = queue.pop(0)
            inflight[workers[w].run.remote(facts[i])] = (w, i)

    for w in list(workers):
        submit(w)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        w, i = inflight.pop(ref)
        try:
            row, err, secs = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:  # the worker died: replace it, retry the fact
            attempts[i] = attempts.get(i, 0) + 1
            if attempts[i] >= 2:
                failed.append({"key": keys[i], "error": f"worker died: {type(e).__name__}"})
                if progress:
                    progress.advance(bar)
            else:
                queue.insert(0, i)
            del workers[w]
            workers[next_id] = Worker.remote(cfg.threads_per_worker)
            w = next_id
            next_id += 1
            submit(w)
            continue
        stats = per_worker.setdefault(f"worker-{w}", {"facts": 0, "seconds": 0.0})
        if err is not None:
            attempts[i] = attempts.get(i, 0) + 1
            if attempts[i] >= 2:
                failed.append({"key": keys[i], "error": err})
                if progress:
                    progress.advance(bar)
            else:
                queue.append(i)
        else:
            journal.add(keys[i], row)
            stats["facts"] += 1
            stats["seconds"] += secs
            done_n += 1
            if progress:
                progress.advance(bar)
            _die_for_tests(done_n)
        submit(w)
    for wk in workers.values():
        ray.kill(wk)
