"""One way to extend the denoiser (STYLE rule 13): every kind of attachment, one interface.

An ``Attachment`` is one unit a request attached, already resolved against the model (its file loaded and
checked to fit it: a misfit is refused, naming what does not fit). A kind acts through some of three
hooks, each given all of a request's units of that kind at once, since their effects add (several LoRAs
on one layer, multi-ControlNet, several image prompts side by side):

- ``attach``: change the model for the request (LoRA's forward hooks, an embedding's new words) and
  return the detach that restores it bit for bit;
- ``inputs``: per-row conditioning the kind reads at each call (which rows are conditional, image tokens);
- ``around``: the network with the units acting at each step, within their share of the steps.

Each unit also says how it is written down: ``record`` (its entry in our JSON record, which ``--from``
reads back) and ``a1111`` (A1111's infotext fields). Attaching at weight 0 changes no pixel. The pipeline
holds a list of attachments and calls the hooks of each kind present; it never asks which kinds they are.
Adding a kind is a file with its ``Attachment`` subclass and a line in ``adapters/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch


def _nothing() -> None:
    return None


class Attachment:
    kind: ClassVar[str]  # its family name for checks (families.AttachmentKind) and messages
    record_key: ClassVar[str]  # where our JSON record lists this kind's units
    per_step: ClassVar[bool] = False  # acts at each step (``around``): needs the torch backend
    whole_image: ClassVar[bool] = False  # reads a map of the whole image: no tiled sampling

    @property
    def label(self) -> str:
        """How messages name this unit (its file's or embedding's name)."""
        return self.kind

    @property
    def made_for(self) -> str | None:
        """The denoiser architecture this unit's weights were made for (families.Family.network), where it is
        tied to one (a UNet ControlNet, an MMDiT ControlNet); None: the family's kinds say enough."""
        return None

    def record(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def attach(cls, units: Sequence[Attachment], model, text_encoder) -> Callable[[], None]:
        """Attach every unit; return the detach, which restores the model exactly."""
        return _nothing

    @classmethod
    def inputs(cls, units: Sequence[Attachment], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Extra conditioning for n conditional rows and n unconditional rows."""
        return {}, {}

    @classmethod
    def around(cls, units: Sequence[Attachment], network, model, timesteps: torch.Tensor):
        """The network with the units acting; ``timesteps``: the network timestep of each sampling step."""
        return network

    @classmethod
    def a1111(cls, records: Sequence[dict], first_unit: int) -> dict[str, str]:
        """A1111's infotext fields for this kind's records; ``first_unit``: the number of extension units
        (sd-webui-controlnet's "ControlNet N") written before these."""
        return {}


def by_kind(attachments: Sequence[Attachment]) -> dict[type[Attachment], list[Attachment]]:
    """The attachments grouped by kind, in the order the kinds first appear."""
    groups: dict[type[Attachment], list[Attachment]] = {}
    for a in attachments:
        groups.setdefault(type(a), []).append(a)
    return groups
