"""Peak memory counts the processes a run starts, not just its own."""

import json
import subprocess
import sys

# Run in a fresh interpreter: the test process's own tree may hold a Ray cluster from
# earlier tests, whose workers' memory moves by hundreds of MB on its own.
MEASURE = """
import json, subprocess, sys
from pdray.monitor import PeakMemory
CHILD = "import numpy, time; a = numpy.ones(50_000_000); print('ready', flush=True); time.sleep(3)"
with PeakMemory(interval=0.1) as alone:
    pass
with PeakMemory(interval=0.1) as mem:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"  # its 400 MB are touched by now
    child.wait()
print(json.dumps({"alone": alone.peak_mb, "with_child": mem.peak_mb}))
"""


def test_peak_memory_includes_child_processes():
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["with_child"] - peaks["alone"] > 350, peaks
