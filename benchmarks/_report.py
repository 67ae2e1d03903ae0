"""Writing one section of docs/BENCHMARKS.md, leaving the others as they are."""

from __future__ import annotations

import re
import resource
import subprocess
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nMeasured figures; each section says how to reproduce it.\n"


def write_section(title: str, body: str, path: Path = DOC) -> None:
    """Replace (or append) the ``## title`` section of ``path`` with ``body``."""
    text = path.read_text() if path.exists() else HEADER
    body = body.strip()
    if body.startswith(f"## {title}"):
        body = body[len(f"## {title}") :].strip()
    section = f"## {title}\n\n{body}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def cpu_description() -> str:
    """The CPU's model name and whether it has native bfloat16 (which the 3D model uses): the
    2-core machines differ, and timings are comparable only on one kind."""
    import platform

    from napari_tumorseg.core.devices import cpu_bf16_is_fast

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, native bfloat16: {'yes' if cpu_bf16_is_fast() else 'no'}"


def run_timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all its threads) of one run of ``command``, which
    must succeed: otherwise the benchmark stops with the command and its error output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
