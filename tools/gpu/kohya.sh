#!/usr/bin/env bash
# Train a LoRA with kohya-ss/sd-scripts' train_network.py, offline, with the settings of our Quick preset:
#   kohya.sh CHECKPOINT IMAGE RESOLUTION [STEPS] OUTDIR [EXTRA_KOHYA_ARGS...]
# CHECKPOINT: an SD1.x .safetensors in the LDM layout; IMAGE: the one training image (centre-cropped and resized to
# RESOLUTION² here, so kohya itself neither crops nor resizes); STEPS: default 500 ("" for the default).
# EXTRA_KOHYA_ARGS are appended to kohya's command line, so they override (e.g. --mixed_precision fp16).
# Writes OUTDIR/kohya.log (kohya's whole output), OUTDIR/kohya.json (one line), OUTDIR/lora/kohya_lora.safetensors.
# Needs .kohya/ (and, on the GPU machine, .whl/ installed on PYTHONPATH) from prepare.sh. CAPTION (env) is the
# caption of the image, default empty. Uses python3 from PATH.
set -euo pipefail

if [[ $# -lt 5 ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KOHYA=$REPO/.kohya
CHECKPOINT=$(realpath "$1")
IMAGE=$(realpath "$2")
RESOLUTION=$3
STEPS=${4:-500}
OUTDIR=$5
shift 5
mkdir -p "$OUTDIR"
OUTDIR=$(realpath "$OUTDIR")
CAPTION=${CAPTION:-}

[[ -f "$KOHYA/train_network.py" ]] || { echo "no $KOHYA/train_network.py: run tools/gpu/prepare.sh first" >&2; exit 1; }
[[ -f "$CHECKPOINT" ]] || { echo "no checkpoint $CHECKPOINT" >&2; exit 1; }
[[ -f "$IMAGE" ]] || { echo "no image $IMAGE" >&2; exit 1; }

# Offline: the tokenizer comes from the cache prepare.sh wrote; nothing may try the network.
export HF_HOME=${KOHYA_HF_HOME:-$KOHYA/hf}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The GPU machine has jax and flax, which diffusers would import (and jax could take GPU memory): keep them out.
export USE_FLAX=0 USE_TF=0 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
[[ -s "$HF_HOME/hub/models--openai--clip-vit-large-patch14/refs/main" ]] ||
    { echo "no tokenizer cache under $HF_HOME: run tools/gpu/prepare.sh first" >&2; exit 1; }

# What kohya will import, and whether the GPU is there.
DEVICE=$(python3 - <<'EOF'
import sys
try:
    import diffusers, transformers, huggingface_hub, tokenizers, toml, voluptuous, imagesize, torch, accelerate
except ImportError as e:
    sys.exit(f"{e}: install .whl first: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir"
             " --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")
print("cuda" if torch.cuda.is_available() else "cpu")
print(" ".join(f"{m.__name__}={m.__version__}" for m in (torch, accelerate, diffusers, transformers, huggingface_hub,
                                                         tokenizers)), file=sys.stderr)
EOF
)
MIXED=no
[[ $DEVICE == cuda ]] && MIXED=bf16

# The data set: the image, made RESOLUTION² here, repeated STEPS times, so the whole run is one epoch (kohya
# restarts its data loader each epoch); no caption file, so kohya uses CAPTION as the class tokens, or "".
rm -rf "$OUTDIR/dataset" "$OUTDIR/lora"
mkdir -p "$OUTDIR/dataset/img" "$OUTDIR/lora"
python3 - "$IMAGE" "$RESOLUTION" "$OUTDIR/dataset/img/image.png" <<'EOF'
import sys
from PIL import Image, ImageOps
image = Image.open(sys.argv[1]).convert("RGB")
side = int(sys.argv[2])
ImageOps.fit(image, (side, side), Image.Resampling.LANCZOS).save(sys.argv[3])
EOF
{
    echo "[general]"
    echo "resolution = $RESOLUTION"
    echo "enable_bucket = false"
    echo "shuffle_caption = false"
    echo "caption_extension = \".txt\""
    echo "flip_aug = false"
    echo "color_aug = false"
    echo "random_crop = false"
    echo "[[datasets]]"
    echo "batch_size = 1"
    echo "[[datasets.subsets]]"
    echo "image_dir = \"$OUTDIR/dataset/img\""
    echo "num_repeats = $STEPS"
    [[ -n "$CAPTION" ]] && echo "class_tokens = $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$CAPTION")"
    true
} >"$OUTDIR/dataset.toml"

ARGS=(
    --pretrained_model_name_or_path "$CHECKPOINT"
    --dataset_config "$OUTDIR/dataset.toml"
    --output_dir "$OUTDIR/lora" --output_name kohya_lora --save_model_as safetensors
    --network_module networks.lora --network_dim 16 --network_alpha 16 --network_train_unet_only
    --max_train_steps "$STEPS"
    --learning_rate 1e-3 --unet_lr 1e-3 --lr_scheduler cosine --lr_warmup_steps 0
    --optimizer_type AdamW --max_grad_norm 1.0
    --mixed_precision "$MIXED" --sdpa --cache_latents
    --seed 0 --max_data_loader_n_workers 0
    "$@"
)
echo "$DEVICE: python3 train_network.py ${ARGS[*]}" >&2

start=$(date +%s.%N)
set +e
(cd "$KOHYA" && exec python3 train_network.py "${ARGS[@]}") >"$OUTDIR/kohya.log" 2>&1
rc=$?
set -e
end=$(date +%s.%N)
if [[ $rc != 0 ]]; then
    tail -c 4000 "$OUTDIR/kohya.log" >&2
    echo "kohya failed (exit $rc); its log: $OUTDIR/kohya.log" >&2
    exit $rc
fi

python3 - "$OUTDIR" "$start" "$end" "$STEPS" "$RESOLUTION" "$DEVICE" "$MIXED" "$KOHYA" <<'EOF'
import json, re, sys
from pathlib import Path
from safetensors import safe_open

out, start, end, steps, resolution, device, mixed, kohya = sys.argv[1:]
commit = Path(kohya) / "COMMIT"
steps = int(steps)
log = (Path(out) / "kohya.log").read_text(errors="replace")
# tqdm's bar, "steps:  40%|████| 2/5 [00:03<00:05,  1.83s/it, avr_loss=0.995]", is drawn with smoothing=0: its rate
# is steps done / time since the bar was made. The first drawing at each count is the one at that step's end (the
# bar is drawn again when the process exits, with the saving time in it); elapsed = count / rate.
draws = re.findall(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[\d:]+<[^,]*,\s*([\d.]+)(it/s|s/it)", log)
elapsed = {}
for done, total, rate, unit in draws:
    if int(total) == steps and float(rate) > 0:
        elapsed.setdefault(int(done), int(done) / (float(rate) if unit == "it/s" else 1 / float(rate)))
if steps not in elapsed:
    sys.exit(f"no finished progress bar of {steps} steps in {out}/kohya.log")
# The steady rate leaves out the first steps (CUDA's warm-up): from the first drawing at or after 10 % of the run.
skip = min((k for k in elapsed if k >= max(1, steps // 10) and k < steps), default=None)
steady = (steps - skip) / (elapsed[steps] - elapsed[skip]) if skip and elapsed[steps] > elapsed[skip] else None
lora = Path(out) / "lora" / "kohya_lora.safetensors"
with safe_open(str(lora), "pt") as f:
    keys = len(list(f.keys()))
record = {
    "wall_s": round(float(end) - float(start), 3),
    "loop_steps_per_s": round(steps / elapsed[steps], 4),  # the whole training loop, first step included
    "loop_s": round(elapsed[steps], 3),
    "steady_steps_per_s": round(steady, 4) if steady else None,  # steps after the first 10 %
    "steps": steps,
    "resolution": int(resolution),
    "lora_file": str(lora),
    "lora_keys": keys,
    "device": device,
    "mixed_precision": mixed,
    "kohya_commit": commit.read_text().strip() if commit.exists() else None,
}
(Path(out) / "kohya.json").write_text(json.dumps(record) + "\n")
print(json.dumps(record))
EOF
