"""Prepare an AUTOMATIC1111 or Forge install for offline integration tests: random models and a CLIP tokenizer.

    python tests/integration/prepare_webui.py --webui /path/to/webui [--family sd1 sd2v sdxl] [--hf-home DIR] [--force]

It writes, without the network:

- `<webui>/models/Stable-diffusion/random-sd15.safetensors` (and `random-sdxl.safetensors` with `--family sdxl`): a
  full-size SD1 (SDXL) model with random weights from a fixed seed, fp16, in the LDM (SGM) layout, so the WebUI loads
  it as an ordinary SD1.5 (SDXL) checkpoint: about 2 GB (7 GB). SDXL is built in fp16 from the start, so writing it
  needs about 8 GB of memory. With `--family sd2v`, `random-sd2v.safetensors`: SD2 768-v (OpenCLIP ViT-H), whose
  UNet output is offset so that A1111's test pass for v-prediction (the mean output at t=999 on a constant input,
  minus that input, below -1) finds v, as it does for the real 768-v model. In Forge Classic (which has no such
  test) its v config is written beside it, `random-sd2v.yaml`.
- `<hf-home>/hub/models--openai--clip-vit-large-patch14/`: the Hugging Face cache entry that A1111's SD1 text
  encoder reads (tokenizer files and the CLIPModel config.json), built from the BPE vocabulary that ships inside
  open-clip-torch. The default `<hf-home>` is `<webui>/hf`.

Start the WebUI with `HF_HOME=<hf-home> HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1` so transformers reads that entry
and never tries to download. Run this with the project's Python (it needs lib_copier and open_clip); when
transformers is importable the tokenizer written is checked against open_clip's on a few prompts.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # any commit hash works as the snapshot name of a hand-made cache entry
CHECKPOINTS = {"sd1": "random-sd15", "sd2v": "random-sd2v", "sdxl": "random-sdxl"}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
V_OFFSET = 3.0  # subtracted from the SD2-v UNet's output bias: A1111's v test reads about -3.5, far below its -1

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "errors": "replace",
    "add_prefix_space": False,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
}
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
# openai/clip-vit-large-patch14's config, the fields that decide the architecture (A1111 builds CLIPTextModel from it).
MODEL_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "projection_dim": 768,
    },
}
CHECK_PROMPTS = ["a photo of a cat", "Hello, World! (masterpiece:1.2), 1girl, café", "don't  stop\tme now 1234"]


def write_checkpoint(webui: Path, family: str, seed: int, force: bool) -> Path:
    import torch

    from lib_copier.models.checkpoint import save_checkpoint
    from lib_copier.models.sd_model import build_model

    path = webui / "models" / "Stable-diffusion" / f"{CHECKPOINTS[family]}.safetensors"
    if path.exists() and not force:
        return path
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if family == "sdxl" else torch.float32)  # SDXL in fp32 would need 14 GB
    try:
        model = build_model(family, seed=seed)
    finally:
        torch.set_default_dtype(default)
    # Freshly initialised norms (weight 1, bias 0) make the text encoder's output mean exactly 0, and A1111's
    # "Original" emphasis divides by that mean: NaN conditioning for batches of prompts. A trained model's norms
    # are never like that, so give them small random offsets; OpenCLIP's are named ln_1, ln_2 and ln_final (without
    # them SD2's conditioning has a mean of ±1e-9 or 0, and LoRA grids drew NaN in A1111 under torch 2.1).
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or ".ln_" in name):
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
        if family == "sd2v":  # A1111 decides v from one test pass; a random UNet would pass or fail it by chance
            model.unet.out[2].bias.sub_(V_OFFSET)
    return save_checkpoint(model, path, dtype=torch.float16, overwrite=True)


def write_v_config(webui: Path, checkpoint: Path) -> Path:
    """Forge Classic takes an SD2 checkpoint for v-prediction only from a `v_pred` key or a config beside the file
    (A1111 also tests the UNet): the 768-v config, copied from the WebUI's own Stability-AI repository."""
    source = webui / "repositories" / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion"
    target = checkpoint.with_suffix(".yaml")
    target.write_bytes((source / "v2-inference-v.yaml").read_bytes())
    return target


def write_clip_cache(hf_home: Path) -> Path:
    """The tokenizer vocabulary and merges exactly as open_clip's SimpleTokenizer builds them, in the HF file format."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(line.split()) for line in lines] + [BOS, EOS]
    files = {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(lines) + "\n",
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2),
        "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2),
        "config.json": json.dumps(MODEL_CONFIG, indent=2),
    }
    entry = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = entry / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text, encoding="utf-8")
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(REVISION)
    (hf_home / "hub" / "version.txt").write_text("1")  # transformers 4.x: no "old cache layout" warning when offline
    return snapshot


def check_tokenizer(snapshot: Path) -> None:
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        return
    from open_clip.tokenizer import SimpleTokenizer

    hf, ours = CLIPTokenizer.from_pretrained(str(snapshot)), SimpleTokenizer()
    for prompt in CHECK_PROMPTS:
        # By name in the vocabulary: open-clip 2.20 (A1111's pin) has no sot_token_id / eot_token_id attributes.
        expected = [ours.encoder["<start_of_text>"], *ours.encode(prompt), ours.encoder["<end_of_text>"]]
        if hf(prompt)["input_ids"] != expected:
            raise SystemExit(f"tokenizer mismatch on {prompt!r}: {hf(prompt)['input_ids']} != {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", type=Path, required=True, help="the WebUI's root directory")
    parser.add_argument("--hf-home", type=Path, help="HF_HOME to write the tokenizer into (default: <webui>/hf)")
    parser.add_argument("--family", nargs="+", choices=sorted(CHECKPOINTS), default=["sd1"],
                        help="which random checkpoints to write (default: sd1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--force", action="store_true", help="rewrite the checkpoint if it already exists")
    args = parser.parse_args()
    snapshot = write_clip_cache(args.hf_home or args.webui / "hf")
    check_tokenizer(snapshot)
    print(f"tokenizer: {snapshot}")
    for family in args.family:
        path = write_checkpoint(args.webui, family, args.seed, args.force)
        print(f"checkpoint: {path}")
        if family == "sd2v" and (args.webui / "ldm_patched").is_dir():
            print(f"config: {write_v_config(args.webui, path)}")


if __name__ == "__main__":
    main()
