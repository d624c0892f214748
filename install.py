"""A1111 runs this at start-up. Everything Copier LoRA needs at run time ships with the WebUI; this installs only what
a trimmed-down install lacks, and never torch or gradio (they belong to the WebUI)."""

import launch

# import name → pip requirement, for the run-time dependencies besides torch and gradio
NEEDED = {
    "safetensors": "safetensors",
    "numpy": "numpy",
    "PIL": "pillow",
    "open_clip": "open-clip-torch",
}

for module, requirement in NEEDED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"{requirement} for Copier LoRA")
