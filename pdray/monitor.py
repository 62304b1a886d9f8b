"""Peak memory, for the memory budgets in the README: of this process alone, or of a
process and everything it started.

A local Ray cluster is the driver's process tree (GCS, raylet, workers, actors), so summing
over the tree measures all of it. Proportional set size (PSS) splits shared pages between
the processes that map them, so shared libraries and the object store count once.
"""

from __future__ import annotations

import resource
import threading
import time

import psutil


def tree_pss_bytes(root: psutil.Process) -> int:
    """PSS of ``root`` and its descendants now; processes that exit meanwhile count 0."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class PeakMemory:
    """Samples this process tree's PSS every ``interval`` seconds while the block runs, or
    less often when a sample is costly: at most ``max_cpu`` of one core goes to sampling.
    PSS makes the kernel walk every page table of the tree, and an evaluation's tree of
    torch actors made the 0.5 s default cost a fifth of a core, taken from the actors.

        with PeakMemory() as mem:
            run()
        mem.peak_mb
    """

    def __init__(self, interval: float = 0.5, max_cpu: float = 0.02):
        self.interval, self.max_cpu, self.peak = interval, max_cpu, 0
        self._root, self._stop = psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            cpu = time.thread_time()
            self.peak = max(self.peak, tree_pss_bytes(self._root))
            cpu = time.thread_time() - cpu
            if self._stop.wait(max(self.interval, cpu / self.max_cpu)):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (not its children's), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
