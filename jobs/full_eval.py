"""Ray job: the full PixelDefend evaluation. Same options as `pdray eval`.

    ray job submit --working-dir . -- python jobs/full_eval.py --dataset cifar10 --n-images 500
"""

import sys

from pdray.cli import app, run

if __name__ == "__main__":
    run(app, ["eval", *sys.argv[1:]])
