"""The batch on a Dask cluster: one task per exam, each worker loading the model once.

``tumorseg segment CASE_DIR... --out-dir DIR --dask [ADDRESS]``: with an address, the tasks
run on that cluster (``dask scheduler`` and ``dask worker`` started by hand, dask-jobqueue on
SLURM/PBS, dask-kubernetes), with Dask's own security settings (TLS certificates from its
configuration); without one, on a `LocalCluster` of worker processes on this machine whose
scheduler, workers and dashboard listen on 127.0.0.1 only.

The workers read the exams and write the outputs themselves, from the paths given (made
absolute): a cluster needs a file system that every worker sees at the same paths. That is
checked on every worker before the first task -- a worker that cannot see a case folder or
write the output folder, or cannot load the model, is a clear error, not a hang.

A case's outputs are staged and renamed into place together (`batch.run_case`): a worker
killed mid-exam leaves none of them half-written, Dask runs the task again on another worker
(up to its ``distributed.scheduler.allowed-failures``), and a case whose workers kept dying is
reported as failed. The cohort report is the single-process batch's (`batch.write_cohort`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .batch import (
    COHORT_EVERY_S,
    BatchOutcome,
    CaseJob,
    batch_about,
    check_batch_outputs,
    failed_row,
    failure_reason,
    plan_batch,
    remove_stale_staging,
    run_case,
    start_outcome,
    write_cohort,
)
from .core.devices import select_device
from .core.errors import TumorSegError
from .core.inference import check_overlap
from .core.models import DEFAULT_MODEL, TumorModel, load_model

#: What to install when Dask is missing.
INSTALL_HINT = 'pip install "napari-tumorseg[dask]" (from a checkout: pip install ".[dask]")'
#: Memory one worker needs for one exam, about (GiB): a LocalCluster has no more workers
#: than the machine's memory holds.
WORKER_MEMORY_GIB = 4.0


def _distributed():
    try:
        import distributed
    except ImportError:
        raise TumorSegError(
            f"--dask needs Dask's distributed scheduler, which is not installed: {INSTALL_HINT}"
        ) from None
    return distributed


def local_cluster_shape(
    workers: int | None = None, threads_per_worker: int | None = None
) -> tuple[int, int]:
    """(workers, threads per worker) for a LocalCluster on this machine, each worker segmenting
    one exam at a time with its threads. By default workers of up to 4 threads (a network's
    convolutions use 4 threads well, and fewer, larger workers hold fewer copies of the model
    and the exams), as many as the cores and the memory (`WORKER_MEMORY_GIB` each) allow."""
    cores = _cores()
    if threads_per_worker is None:
        threads_per_worker = min(4, max(1, cores // workers) if workers else cores)
    if workers is None:
        workers = max(1, cores // threads_per_worker)
        memory = _memory_gib()
        if memory:
            workers = max(1, min(workers, int(memory // WORKER_MEMORY_GIB)))
    if workers < 1 or threads_per_worker < 1:
        raise TumorSegError("--workers and --threads-per-worker must be at least 1")
    return workers, threads_per_worker


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


@contextmanager
def dask_client(address: str | None = None, workers: int = 1) -> Iterator:
    """A `distributed.Client` of the cluster at ``address``, or of a new LocalCluster of
    ``workers`` worker processes bound to 127.0.0.1 (closed on exit), each running one exam
    at a time."""
    distributed = _distributed()
    if address:
        try:
            client = distributed.Client(address, timeout=30)
        except OSError as exc:  # TimeoutError included
            raise TumorSegError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        with client:
            yield client
        return
    cluster = distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,  # Dask's threads run tasks: one exam at a time per worker
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:8787",  # another free port if that one is taken
        scheduler_port=0,
    )
    with cluster, distributed.Client(cluster) as client:
        yield client


# --- on the workers -------------------------------------------------------------------------

#: The models a worker process has loaded, by name: loaded once, kept for every later case.
_MODELS: dict[str, TumorModel] = {}


def worker_model(name: str) -> TumorModel:
    """The model ``name``, loaded once per worker process."""
    if name not in _MODELS:
        _MODELS[name] = load_model(name)
        _malloc_as_glibc_default()
    return _MODELS[name]


def _malloc_as_glibc_default() -> None:
    """Undo Dask's MALLOC_TRIM_THRESHOLD_=65536 in this worker process (glibc only).

    Dask's nanny starts workers with it to hand freed memory back to the system sooner; it
    also freezes glibc's mmap threshold at 128 kB, so every array an exam's preprocessing makes
    and frees is mapped and unmapped again: a 3D segmentation took 4.4 s in a worker against
    3.3 s without it (benchmarks/bench_cluster.py). These are the values glibc's own dynamic
    thresholds reach (32 MiB, and twice that for trimming)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 64 * 2**20)
    except (OSError, AttributeError):  # not glibc: nothing to undo
        pass


def check_worker(cases: list[str], folders: list[str], model: str, device: str) -> dict:
    """Run on every worker before the first task: what this worker cannot do (``problems``),
    its host and the cores it may use. Also loads the model, so that the first task does not
    pay for it."""
    problems = [f"cannot see the case folder {case}" for case in cases if not os.path.isdir(case)]
    for folder in folders:
        if not os.path.isdir(folder):
            problems.append(f"cannot see the output folder {folder}")
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"cannot write to the output folder {folder}")
    try:
        select_device(device)
        worker_model(model)
    except TumorSegError as exc:
        problems.append(str(exc))
    return {"problems": problems, "host": socket.gethostname(), "cores": _cores()}


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def segment_case_task(
    job: CaseJob, model: str, options: dict, threads: dict[str, int]
) -> tuple[dict, list[str]]:
    """One exam on a worker: its cohort row and its log lines. torch gets ``threads[host]``
    threads (`torch_threads`; Dask's nanny starts workers with OMP_NUM_THREADS=1); a worker
    restarted since, on a host not planned for, the fewest planned."""
    import torch
    from distributed import get_worker

    worker = get_worker().address
    host = socket.gethostname()
    torch.set_num_threads(threads.get(host, min(threads.values(), default=1)))
    lines: list[str] = []
    row = run_case(job, worker_model(model), log=lines.append, worker=worker, **options)
    return row, lines


def torch_threads(
    answers: dict[str, dict], nthreads: dict[str, int], fixed: int | None = None
) -> dict[str, int]:
    """Host -> torch threads for each exam its workers run: ``fixed`` (a LocalCluster's
    ``--threads-per-worker``), or the host's cores shared among the exams its workers run at
    once (a worker runs as many as it has Dask threads), so that no host is oversubscribed.
    ``answers``: `check_worker`'s, by worker address; ``nthreads``: Dask threads by worker."""
    slots: dict[str, int] = {}
    cores: dict[str, int] = {}
    for worker, answer in answers.items():
        host = answer["host"]
        slots[host] = slots.get(host, 0) + nthreads.get(worker, 1)
        cores[host] = min(cores.get(host, answer["cores"]), answer["cores"])
    if fixed is not None:
        return dict.fromkeys(slots, fixed)
    return {host: max(1, cores[host] // slots[host]) for host in slots}


# --- on the client --------------------------------------------------------------------------


def _absolute(job: CaseJob) -> CaseJob:
    """The job with absolute paths: a worker's working folder is not the client's."""

    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(os.path.abspath(path))

    return dataclasses.replace(
        job,
        case=absolute(job.case),
        out=absolute(job.out),
        prob=absolute(job.prob),
        report=absolute(job.report),
        kept=tuple(absolute(p) for p in job.kept),
    )


def check_workers(
    client, jobs: Sequence[CaseJob], folders, model: str, device: str, fixed: int | None = None
) -> dict[str, int]:
    """Run `check_worker` on every worker; a clear error naming the worker and the problem
    when one cannot do its part. Returns each host's torch threads per exam (`torch_threads`;
    ``fixed``: a LocalCluster's)."""
    try:
        if not client.nthreads():
            client.wait_for_workers(1, timeout=120)
        answers = client.run(
            check_worker,
            [str(job.case) for job in jobs],
            [os.path.abspath(f) for f in folders],
            model,
            device,
        )
    except TimeoutError:
        raise TumorSegError("the Dask cluster has no worker (none joined in 120 s)") from None
    except Exception as exc:  # noqa: BLE001 -- a worker without the plugin, or another one
        raise TumorSegError(
            f"a Dask worker could not check its part of the batch ({type(exc).__name__}: "
            f"{exc}): the workers need napari-tumorseg installed, the same version as here"
        ) from None
    problems = [
        f"{worker}: {problem}"
        for worker, answer in answers.items()
        for problem in answer["problems"]
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise TumorSegError(
            "the Dask workers cannot do this batch: "
            + "; ".join(problems[:5])
            + more
            + ". The workers read the exams and write the outputs themselves: they need a "
            "file system that holds them at the same paths, and the model"
        )
    return torch_threads(answers, client.nthreads(), fixed)


def segment_folders_on_dask(
    cases: Sequence[Path],
    out_dir: Path,
    prob_dir: Path | None = None,
    skip_existing: bool = False,
    model: str = DEFAULT_MODEL,
    address: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    log: Callable[[str], None] = print,
    on_written: Callable[[Path], None] | None = None,
    progress: bool = True,
    **options,
) -> BatchOutcome:
    """`batch.segment_folders` with one Dask task per exam: the same checks before the first
    exam, the same outputs, report and guarantees (``skip_existing`` resumes, a failing case is
    reported and the others go on). ``address``: a running cluster's scheduler; None: a
    LocalCluster of ``workers`` x ``threads_per_worker`` (`local_cluster_shape`).
    ``progress``: a progress bar on stderr (tqdm)."""
    _distributed()
    plan = plan_batch(cases, out_dir, prob_dir, skip_existing)
    check_overlap(options.get("overlap", 0.5))
    device = options.get("device", "auto")
    select_device(device)
    tumour_model = load_model(model)  # a model that is not there fails before the cluster
    check_batch_outputs(out_dir, prob_dir)
    jobs = [_absolute(job) for job in plan.jobs]
    outcome = start_outcome(plan, log)
    folders = [f for f in (out_dir, prob_dir) if f is not None]
    fixed = None  # torch threads: from each host's cores on a cluster at an address
    if address:
        if workers is not None or threads_per_worker is not None:
            raise TumorSegError(
                "--workers and --threads-per-worker shape a local cluster: a cluster at an "
                "address has the workers it was started with"
            )
    else:
        workers, fixed = local_cluster_shape(workers, threads_per_worker)
    with dask_client(address, workers or 1) as client:
        about = batch_about(
            tumour_model, options, engine=f"Dask, scheduler {client.scheduler.address}"
        )
        log(f"Dask dashboard: {client.dashboard_link}")
        threads = {}
        if jobs:
            threads = check_workers(client, jobs, folders, model, device, fixed)
            log(
                f"{len(jobs)} exams on {len(client.nthreads())} Dask workers, "
                f"{sum(client.nthreads().values())} at a time; torch threads per exam: "
                + ", ".join(f"{n} on {host}" for host, n in threads.items())
            )
        run = (client, jobs, model, options, threads)
        _run_jobs(run, outcome, about, Path(out_dir), log, on_written, progress)
    return outcome


def _run_jobs(run, outcome, about, out_dir, log, on_written, progress):
    from distributed import as_completed

    client, jobs, model, options, threads = run
    futures = {
        client.submit(
            segment_case_task,
            job,
            model,
            options,
            threads,
            pure=False,
            key=f"tumorseg-{job.name}-{i}",
        ): job
        for i, job in enumerate(jobs)
    }
    bar = _progress_bar(len(jobs), progress)
    say = bar.write if bar is not None else log
    written_at = time.monotonic()
    try:
        for future in as_completed(futures):
            job = futures.pop(future)
            try:
                row, lines = future.result()
            except Exception as exc:  # noqa: BLE001 -- one case never stops the batch
                row, lines = failed_row(job, _task_failure(exc)), []
                lines.append(f"error: {row['reason']}")
            say(_case_line(job, row))
            for line in lines:  # the worker's log: its warnings and errors, not its progress
                if line.startswith(("warning", "error")):
                    say(f"  {line}")
            outcome.add(row)
            for path in row.get("written", ()):
                if on_written is not None:
                    on_written(Path(path))
            if bar is not None:
                bar.update(1)
            if time.monotonic() - written_at > COHORT_EVERY_S:
                write_cohort(out_dir, outcome.rows, about)
                written_at = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
        for future in futures:  # interrupted: the cases not done are not left running
            future.cancel()
        write_cohort(out_dir, outcome.rows, about)
        removed = remove_stale_staging(jobs) if not futures else 0
        if removed:
            log(f"removed {removed} staging file(s) of tasks whose worker died mid-write")


def _case_line(job: CaseJob, row: dict) -> str:
    """One line for a finished case: how it ended, in how long, where."""
    line = f"{job.case}: {row['status']}"
    if row.get("seconds") is not None:
        line += f" in {row['seconds']:.1f} s"
    if row.get("worker"):
        line += f" on {row['worker']}"
    return line


def _task_failure(exc: BaseException) -> str:
    """Why a task failed, from the client's side: its worker kept dying, or else."""
    if type(exc).__name__ == "KilledWorker":
        return (
            "the worker segmenting it died every time it was tried (out of memory, or killed); "
            f"Dask gave up: {exc}"
        )
    return failure_reason(exc)


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="exam", file=sys.stderr, desc="segmenting")
