"""Copier LoRA: copier / processed / difference-extraction LoRAs for Stable Diffusion.

Importing this package never imports the WebUI's `modules`; see DESIGN.md for the layers.
"""

__version__ = "0.1.0"
