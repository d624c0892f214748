"""kohya-format LoRA files, the naming table between LDM module paths and kohya keys, injection, and LoRA math."""
