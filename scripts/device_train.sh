#!/usr/bin/env bash
# Continue training the embedded models on a lent GPU machine, one `run` call at a time
# (each call is limited to 10 minutes, so train for fewer and let the trainer checkpoint).
#
# Here, once: echo /.whl/ >> .git/info/exclude; echo /runs/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl \
#       nibabel==X nilearn==Y      (the GPU image has torch, numpy, scipy, h5py, pandas)
#   cp -r PATH/TO/runs/affine runs/   (the CPU checkpoints: training resumes from them)
# Each call: run(command="bash scripts/device_train.sh affine 8 20000", carry=[".whl", "runs"])
# then copy $OUT/runs back over runs/.
set -euo pipefail
model=${1:?usage: device_train.sh affine|joint MINUTES STEPS}
minutes=${2:-8}
steps=${3:-20000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
extra=()
if [ "$model" = joint ] && [ -f runs/affine/model.pt ]; then
    extra=(--affine-weights runs/affine/model.pt)
fi
python3 -m synthmorph_nipype.cli.main train --config "configs/embedded_$model.toml" \
    --out "runs/$model" --steps "$steps" --device cuda --max-minutes "$minutes" -q "${extra[@]}"
mkdir -p "$OUT/runs" && cp -r "runs/$model" "$OUT/runs/"
