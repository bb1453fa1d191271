"""Small helpers shared by the bench scripts: machine description and a timed denoiser."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a benchmark number needs next to it: cores, CPU, threads, versions, date."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit}


class Timed:
    """Wraps a denoiser or network; ``seconds`` (wall) and ``cpu_seconds`` (this process's
    CPU time, robust to other jobs on a shared machine) accumulate the time spent inside it
    and ``calls`` counts the calls, so a loop's own time is its total minus these."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.seconds, self.cpu_seconds, self.calls = 0.0, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.calls += 1
        return out


class Clock:
    """``with Clock() as c: ...`` -> c.wall, c.cpu (seconds)."""

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._t, time.process_time() - self._c
        return False


def replace_section(doc, heading: str, section: str) -> None:
    """Put ``section`` (starting with ``heading``, a '## ' line) into the markdown file
    ``doc`` in place of the section of that heading (up to the next '## '), or append it."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def _blocks(section: str) -> tuple[str, dict]:
    """A section's text before its first '### ' and its '### ' blocks keyed by the heading up
    to its first ' (' or ':' (the part's name, without the settings that may change)."""
    parts = section.split("\n### ")
    head, blocks = parts[0], {}
    for b in parts[1:]:
        title = b.split("\n", 1)[0]
        blocks[title.split(" (", 1)[0]] = "### " + b.rstrip() + "\n"
    return head, blocks


def merge_section(doc, heading: str, md: str) -> str:
    """The section ``md`` (a '## ' heading and '### ' parts) merged into the section of
    ``heading`` in ``doc``: the parts rendered now replace the same parts there, the other
    parts (rendered earlier from result files not given now) are kept, in their order."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else ""
    start = text.find(heading)
    if start < 0:
        return md
    end = text.find("\n## ", start + len(heading))
    _, old = _blocks(text[start:end if end >= 0 else len(text)])
    head, new = _blocks(md)
    return head.rstrip() + "\n\n" + "\n".join({**old, **new}.values())


def publish(md: str, doc, heading: str) -> None:
    """Print a bench's markdown and, with ``doc``, merge it into that file's section ``heading``."""
    print(md)
    if doc:
        replace_section(doc, heading, merge_section(doc, heading, md))


def fmt(v, p: int = 4) -> str:
    """A table cell: '-' for None, a float to ``p`` decimals, anything else as text."""
    return "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))


def where(m: dict) -> str:
    """The machine line of a table from :func:`machine`'s dict."""
    return f"{m['nproc']} cores ({m['cpu']}), torch {m['torch']}, {m['date']}, commit {m['commit']}"


def save_part(out: Path, name: str, res: dict) -> None:
    """A benchmark part's results as ``out/NAME.json``, with this machine's description."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    res["machine"] = machine()
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))


def load_part(out: Path, name: str) -> dict:
    """``out/NAME.json`` of :func:`save_part`, or {} before that part ran."""
    import json

    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}
