"""Ray job: train the PixelCNN on Ray Train. Same options as `pdray train pixelcnn`.

    ray job submit --working-dir . -- python jobs/train_pixelcnn.py --dataset cifar10 --gpu
"""

import sys

from pdray.cli import app, run

if __name__ == "__main__":
    run(app, ["train", "pixelcnn", *sys.argv[1:]])
