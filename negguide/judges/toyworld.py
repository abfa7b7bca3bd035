"""The ``toyworld`` judge: ToyWorld's exact colour detector, offline (``negguide toyworld bench`` counts with it)."""

from __future__ import annotations

from typing import Any
from typing import final

from pydantic import Field

from negguide.errors import ConfigError
from negguide.hookspecs import hookimpl
from negguide.judge import Judge
from negguide.judge import JudgeConfig
from negguide.judge import Verdict


@hookimpl
def register_judges(register: Any) -> None:
    register(ToyWorldJudge)


class ToyWorldJudgeConfig(JudgeConfig):
    """The detector has no settings but how many pixels make an object."""

    min_pixels: int = Field(12, ge=1, le=1024, description="Pixels of an object's colour that make it present.")


@final
class ToyWorldJudge(Judge):
    """Counts ToyWorld's objects by colour: positive if the prompt's object is drawn, removed if the
    negative's is not, quality the share of clean (palette or white) pixels."""

    name = "toyworld"
    Config = ToyWorldJudgeConfig

    def judge(self, image: Any, item: dict[str, Any]) -> Verdict:
        import numpy as np

        from negguide.toyworld import world

        names = [world.object_name(i) for i in range(len(world.OBJECTS))]
        wanted = {"prompt": item.get("prompt"), "missing_element": item.get("missing_element")}
        for key, value in wanted.items():
            if value not in names:
                raise ConfigError(
                    f"judge toyworld: expected `{key}` to be a ToyWorld object ({', '.join(map(repr, names))}), "
                    f"got {value!r}; use the built-in set `toyworld` or another judge"
                )
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
        unit = (pixels.astype(np.float64) + 1) / 2

        def present(index: int) -> bool:
            colour = np.asarray(world.COLORS[world.OBJECTS[index][0]])[None, :, None, None]
            close = (np.abs(unit - colour).max(axis=1) < world.COLOR_TOL).sum(axis=(1, 2))
            return bool(close[0] >= self.config.min_pixels)

        positive = present(names.index(wanted["prompt"]))
        removed = not present(names.index(wanted["missing_element"]))
        quality = float(world.cleanliness(pixels)[0])
        raw = {"positive": positive, "removed": removed, "clean": quality}
        return Verdict(positive=positive, removed=removed, quality=quality, raw=raw)
