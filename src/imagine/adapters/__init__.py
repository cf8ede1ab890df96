"""What attaches to a denoiser without changing its file, through one protocol (attachment.py): LoRAs
(lora.py), textual-inversion embeddings (embeddings.py), ControlNet and T2I-Adapter units (control.py) and
image prompts (image_prompt.py). A new kind is a file with its Attachment subclass and a line here."""

from imagine.adapters.attachment import Attachment
from imagine.adapters.control import Conditioner
from imagine.adapters.embeddings import EmbeddingUse
from imagine.adapters.image_prompt import Prompted
from imagine.adapters.lora import LoraUse

# Every kind, in the order a request attaches them (and its PNG lists them)
ATTACHMENTS: tuple[type[Attachment], ...] = (LoraUse, EmbeddingUse, Conditioner, Prompted)

__all__ = ["ATTACHMENTS", "Attachment", "Conditioner", "EmbeddingUse", "LoraUse", "Prompted"]
