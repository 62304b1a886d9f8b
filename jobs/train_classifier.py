"""Ray job: train a Table 1 classifier on Ray Train. Same options as `pdray train classifier`.

    ray job submit --working-dir . -- python jobs/train_classifier.py --dataset cifar10 --gpu
"""

import sys

from pdray.cli import app, run

if __name__ == "__main__":
    run(app, ["train", "classifier", *sys.argv[1:]])
