#!/usr/bin/env bash
# Issue 19's GPU measurements as one device call: our trainer beside kohya's train_network.py on the same card, the
# same random-weight SD1.5 checkpoint and the same settings; a profile; SDXL; the WebUI path's CUDA tests.
#   (on the GPU machine, from the repo root, with .whl and .kohya carried)   bash tools/gpu/run.sh
# Each part has its own time limit and writes its figures to $OUT as soon as it ends, so a part that runs long costs
# only itself. Parts, in order of importance: ours SD1.5 copier (+ profile, host syncs), kohya SD1.5, CUDA tests,
# ours with the Fast preset (batch 4), ours with gradient checkpointing (memory), ours SDXL, ours whole recipe.
# STEPS (default 500) and RES (512) set the SD1.5 runs; SDXL_RES=0 skips SDXL. The limits add up to 550 s; $OUT gets 9
# files. A dry run on a CPU:
#   STEPS=2 RES=64 SDXL_RES=0 LIMIT_SCALE=10 OUT=/tmp/dry bash tools/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
STEPS=${STEPS:-500}
RES=${RES:-512}
SDXL_RES=${SDXL_RES:-1024}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
start=$SECONDS
part() { echo; echo "=== $1 (at ${SECONDS}s)"; }
limit() { timeout $(($1 * ${LIMIT_SCALE:-1})) "${@:2}"; }  # LIMIT_SCALE stretches every limit for a CPU dry run
part_of() { echo $(($1 / $2 > 0 ? $1 / $2 : 1)); }        # STEPS / N, at least one step

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

part "checkpoint and image"
W=/tmp/webui
limit 50 python3 tests/integration/prepare_webui.py --webui $W --family sd1 --hf-home /tmp/hf
CKPT=$W/models/Stable-diffusion/random-sd15.safetensors
python3 -c "from lib_copier.train.bench import _image; _image(None, max($RES, 257)).resize(($RES, $RES)).save('/tmp/o.png')"

part "ours: SD1.5 $RES copier, $STEPS steps, profile"
limit 110 python3 -m lib_copier bench train --model $CKPT --resolution "$RES" --steps "$STEPS" --stages copier \
    --no-fidelity --profile "$OUT/profile-sd15.txt" --json "$OUT/ours-sd15-copier.json"

part "kohya: SD1.5 $RES, $STEPS steps"
limit 120 bash tools/gpu/kohya.sh $CKPT /tmp/o.png "$RES" "$STEPS" /tmp/kohya
cp /tmp/kohya/kohya.json "$OUT/kohya-sd15.json"
tail -c 20000 /tmp/kohya/kohya.log >"$OUT/kohya-sd15.log"

part "CUDA tests: the WebUI path, and master tensors against per-tensor casting"
limit 70 python3 -m pytest -q -p no:cacheprovider tests/test_webui_cuda.py \
    tests/test_master.py::test_training_with_a_master_tensor_gives_the_same_lora_and_leaves_the_model_bit_identical

part "ours: SD1.5 $RES copier, the Fast preset: a quarter of the steps, four timesteps each (batch 4)"
limit 50 python3 -m lib_copier bench train --model $CKPT --resolution "$RES" --preset fast --steps $(part_of $STEPS 4) \
    --stages copier --no-fidelity --json "$OUT/ours-sd15-copier-fast.json"

part "ours: SD1.5 $RES copier with gradient checkpointing, a fifth of the steps (memory against speed)"
limit 30 python3 -m lib_copier bench train --model $CKPT --resolution "$RES" --steps $(part_of $STEPS 5) --stages copier \
    --no-fidelity --gradient-checkpointing --json "$OUT/ours-sd15-copier-checkpointing.json"

if [[ $SDXL_RES != 0 ]]; then
    part "ours: SDXL $SDXL_RES copier, 100 steps"
    limit 70 python3 -m lib_copier bench train --family sdxl --resolution "$SDXL_RES" --steps 100 --stages copier \
        --json "$OUT/ours-sdxl-copier.json"
fi

part "ours: SD1.5 $RES whole recipe (copier, processed, extraction)"
limit 50 python3 -m lib_copier bench train --model $CKPT --resolution "$RES" --steps "$STEPS" --no-fidelity \
    --json "$OUT/ours-sd15-recipe.json"

echo; echo "done in $((SECONDS - start)) s"
