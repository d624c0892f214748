"""The processed side of each pair: an effect chain applied to every original, or an image the user edited of one,
and the checks that keep a pair worth learning from (it differs, and it lines up with its original)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lib_copier.effects.chain import Chain
from lib_copier.errors import CopierError


@dataclass
class Effect:
    """One processed image per original: an effect chain applied to it, or an image the user edited."""

    label: str
    chain: Chain | None = None
    image: Image.Image | None = None

    def process(self, original: Image.Image) -> Image.Image:
        if self.image is not None:
            return self.image.convert("RGB").resize(original.size, Image.Resampling.LANCZOS)
        return self.chain.apply(original)

    def preview(self, original: Image.Image) -> tuple[Image.Image, str]:
        """The processed image with its caption, which says so when the effect changes nothing (Train refuses it)."""
        processed = self.process(original)
        return processed, self.label if changed(original, processed) else f"{self.label}: no change"

    def process_all(self, originals: list[Image.Image]) -> list[Image.Image]:
        """The processed image of each original; refused when none of them changes, as the LoRA would learn nothing."""
        processed = [self.process(original) for original in originals]
        if not any(changed(o, p) for o, p in zip(originals, processed, strict=True)):
            self._refuse(len(originals))
        return processed

    def check_changes(self, originals: list[Image.Image]) -> None:
        """`process_all`'s refusal, processing only up to the first original the effect changes."""
        if not any(changed(original, self.process(original)) for original in originals):
            self._refuse(len(originals))

    def _refuse(self, count: int) -> None:
        which = "the original" if count == 1 else f"all {count} originals"
        if self.image is not None:
            problem, fix = f"the processed image {self.label!r} is the same as {which}", "upload an edited one"
        else:
            problem, fix = f"{self.label} leaves {which} unchanged", "change its settings or pick another effect"
        raise CopierError(f"{problem}, so its LoRA would have nothing to learn; {fix}")


def check_pairs(effects: list[Effect], originals: list[Image.Image]) -> None:
    """Before any work: each effect makes a pair worth learning from with these originals (as given, before they
    are fitted to the model). A processed image the user edited belongs to one original, framed as it is: the two
    are compared pixel by pixel, so a crop would teach the LoRA a shift. And each effect changes some original
    (`Effect.check_changes`; the job's `process_all` checks again on the originals as fitted)."""
    edits = [effect for effect in effects if effect.image is not None]
    if edits and len(originals) > 1:
        raise CopierError(
            f"your processed image {edits[0].label!r} is an edit of one original, but there are {len(originals)}; "
            "train it with that original alone, or choose effects, which process each original"
        )
    for effect in edits:
        (w, h), (ew, eh) = originals[0].size, effect.image.size
        if abs(w * eh / (h * ew) - 1) > 0.01:  # resized to the original's size, it would stretch by more than 1%
            raise CopierError(
                f"your processed image {effect.label!r} is {ew}x{eh} but the original is {w}x{h}; an edit must keep "
                "the original's framing (scaled is fine, cropped is not), as the two are compared pixel by pixel"
            )
    for effect in effects:
        effect.check_changes(originals)


def changed(original: Image.Image, processed: Image.Image) -> bool:
    """Whether any pixel moved by more than rounding (one level of 255)."""
    a = np.asarray(original.convert("RGB"), dtype=np.int16)
    return int(np.abs(a - np.asarray(processed.convert("RGB"), dtype=np.int16)).max()) > 1


def make_effects(chains: list[list[str]], edited: list[tuple[str, Image.Image]] = ()) -> list[Effect]:
    """Effects from chain specs (`[["outline:thickness=3", "grayscale"], ["posterize"]]`) and from images the
    user edited (label, image), labelled for file names; the same label twice gets numbered."""
    from lib_copier.names import slug

    effects = []
    for specs in chains:
        chain = Chain.parse(specs)
        if any(effect.chain == chain for effect in effects):  # its LoRA would be trained twice, to the same end
            raise CopierError(f"the effect {'+'.join(specs)} is given twice, with the same parameters")
        effects.append(Effect("-".join(slug(s.effect, 20) for s in chain.steps), chain=chain))
    effects += [Effect(slug(label, 30), image=image) for label, image in edited]
    seen: dict[str, int] = {}
    for effect in effects:
        seen[effect.label] = seen.get(effect.label, 0) + 1
        if seen[effect.label] > 1:
            effect.label = f"{effect.label}-{seen[effect.label]}"  # "edited128-2", not "edited1282"
    return effects
