"""What attaches to a UNet without changing its file: LoRA (lora.py), ..."""
