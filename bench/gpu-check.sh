#!/usr/bin/env bash
# The GPU path, measured where there is a GPU: for both shipped PixelCNNs (fmnist-pixelcnn,
# cifar10-pixelcnn) and batches of 256 and 1024, `pdray bench purify --device cuda` gives the
# fast purifier's agreement with Algorithm 1 and its images/s. Prints ONE JSON line:
#   {"gpu": true, "runs": [<bench purify's JSON>, ...]}
# Without a GPU it measures nothing, prints {"gpu": false, ...} and exits 0, so it runs
# anywhere. A failed run prints {"gpu": true, "error": ...} (pdray's message on stderr), exit 1.
#
# PYTHON: the interpreter pdray is installed in (default python3).
# FMNIST_DATA_DIR, CIFAR10_DATA_DIR: passed as --data-dir when set (else pdray's own search).
# AGREEMENT_IMAGES: images run in full by Algorithm 1 for the agreement (default 2).
set -euo pipefail

PYTHON=${PYTHON:-python3}
pdray() { "$PYTHON" -c 'from pdray.cli import main; main()' "$@"; }

if ! probe=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'); then
    echo "{\"gpu\": null, \"error\": \"$PYTHON cannot import torch; set PYTHON to the interpreter pdray is installed in\"}"
    exit 1
fi
read -r torch_version cuda <<< "$probe"
if [[ $cuda != True ]]; then
    echo "{\"gpu\": false, \"torch\": \"$torch_version\", \"message\": \"no GPU: torch sees no CUDA device here, so nothing was measured; run bench/gpu-check.sh on a machine with a GPU and a CUDA build of torch\"}"
    exit 0
fi

runs=()
for dataset in fmnist cifar10; do
    dir_var=${dataset^^}_DATA_DIR
    for batch in 256 1024; do
        if ! run=$(pdray bench purify --dataset "$dataset" --device cuda --batch-size "$batch" \
                     --n-images "$batch" --agreement-images "${AGREEMENT_IMAGES:-2}" --json \
                     ${!dir_var:+--data-dir "${!dir_var}"}); then
            echo "{\"gpu\": true, \"error\": \"pdray bench purify failed on $dataset at batch $batch (its message is above, on stderr)\"}"
            exit 1
        fi
        runs+=("$run")
    done
done
(IFS=,; echo "{\"gpu\": true, \"torch\": \"$torch_version\", \"runs\": [${runs[*]}]}")
