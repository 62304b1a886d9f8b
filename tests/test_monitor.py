"""Peak memory counts the processes a run starts, not just its own."""

import subprocess
import sys

from pdray.monitor import PeakMemory

CHILD = "import numpy, time; a = numpy.ones(50_000_000); print('ready', flush=True); time.sleep(3)"


def test_peak_memory_includes_child_processes():
    with PeakMemory(interval=0.1) as alone:
        pass
    with PeakMemory(interval=0.1) as mem:
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"  # its 400 MB are touched by now
        child.wait()
    assert mem.peak_mb - alone.peak_mb > 350
