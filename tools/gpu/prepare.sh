#!/usr/bin/env bash
# Fill the ignored folders that the GPU machine needs to run kohya-ss/sd-scripts' train_network.py (see README.md):
#   .kohya/      kohya's train_network.py, library/, networks/ (never committed), and hf/, the offline HF cache of
#                the openai/clip-vit-large-patch14 tokenizer that kohya's SD1 path loads
#   .whl/        the wheels kohya needs that the GPU machine lacks or has in versions kohya cannot use
# Run here (with the network to PyPI), from anywhere; rerunning it changes nothing that is already right.
# Environment: KOHYA_GIT (the mirrored sd-scripts git dir), KOHYA_REV (default HEAD), PYTHON (one with open_clip,
# to write the tokenizer cache; default python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KOHYA_GIT=${KOHYA_GIT:-/work/.mirror/kohya-ss+sd-scripts/repo}
KOHYA_REV=${KOHYA_REV:-HEAD}
PYTHON=${PYTHON:-python3}
KOHYA=$REPO/.kohya
WHL=$REPO/.whl

# diffusers 0.32.1 and transformers 4.54.1 are kohya's own pins; transformers 4.54 needs huggingface-hub <1 and
# tokenizers 0.21, so those travel too (the device's transformers 5 / hub 1 / tokenizers 0.22 are shadowed).
# toml, voluptuous, imagesize are absent there. Everything else kohya's SD1 path imports (torch, torchvision,
# accelerate, safetensors, numpy, pillow, opencv, einops, tqdm, rich, packaging, regex, requests, pyyaml,
# filelock, fsspec, hf-xet) is the device's own.
WHEELS=(
    diffusers==0.32.1
    transformers==4.54.1
    tokenizers==0.21.4
    huggingface-hub==0.34.3
    toml==0.10.2
    voluptuous==0.15.2
    imagesize==1.4.1
    # our own: open_clip (its BPE vocabulary is our tokenizer's) and what it needs that the device lacks
    open-clip-torch==3.3.0
    ftfy==6.3.1
    wcwidth==0.7.0
)

# 1. Keep both folders out of git.
exclude=$REPO/.git/info/exclude
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
for entry in /.kohya/ /.whl/; do
    grep -qxF "$entry" "$exclude" || echo "$entry" >>"$exclude"
done

# 2. kohya's source: only what train_network.py needs for SD1.
commit=$(git --git-dir="$KOHYA_GIT" rev-parse "$KOHYA_REV^{commit}")
if [[ "$(cat "$KOHYA/COMMIT" 2>/dev/null)" != "$commit" || ! -f "$KOHYA/train_network.py" ]]; then
    rm -rf "$KOHYA/train_network.py" "$KOHYA/library" "$KOHYA/networks" "$KOHYA/COMMIT"
    mkdir -p "$KOHYA"
    # (the mirror lacks some large unrelated blobs, and git archive complains about them: not about these paths)
    git --git-dir="$KOHYA_GIT" archive "$commit" train_network.py library networks 2> >(grep -v 'invalid object' >&2) \
        | tar -x -C "$KOHYA"
    find "$KOHYA/library" "$KOHYA/networks" -name '*.md' -delete
    echo "$commit" >"$KOHYA/COMMIT"
    echo "kohya sd-scripts $commit -> $KOHYA"
fi

# 3. The tokenizer cache (the GPU machine has no open_clip to build it).
snapshot=$KOHYA/hf/hub/models--openai--clip-vit-large-patch14/snapshots/0000000000000000000000000000000000000000
if [[ ! -s "$snapshot/vocab.json" || ! -s "$snapshot/merges.txt" ]]; then
    "$PYTHON" - "$REPO" "$KOHYA/hf" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "tests" / "integration"))
from prepare_webui import write_clip_cache
print("tokenizer cache ->", write_clip_cache(Path(sys.argv[2])))
EOF
fi

# 4. The wheels: exactly the list above, one version of each.
mkdir -p "$WHL"
wanted=()
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    version=${spec##*==}
    stem="$(echo "$name" | tr '-' '_')-$version-"
    found=$(ls "$WHL" | grep -i "^$stem" | head -1 || true)
    if [[ -z "$found" ]]; then
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHL" "$spec" 2> >(grep -v 'is ignored: it is neither' >&2)
        found=$(ls "$WHL" | grep -i "^$stem" | head -1)
    fi
    wanted+=("$found")
done
for file in "$WHL"/*; do
    keep=0
    for w in "${wanted[@]}"; do [[ "$(basename "$file")" == "$w" ]] && keep=1; done
    if [[ $keep == 0 ]]; then
        echo "removing $file (not in the list)"
        rm -f "$file"
    fi
done

du -sh "$KOHYA" "$WHL"
du -sch "$KOHYA" "$WHL" | tail -1
