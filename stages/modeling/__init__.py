"""Models with torch: loading (Hub, local, GGUF, the tiny Llama), LoRA/QLoRA, saving, the chat template, the
Trainer glue and experiment trackers."""
