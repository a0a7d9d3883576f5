"""Layer plans: which mixer every layer of a converted model uses."""

from __future__ import annotations

from ..model.names import MIXER_TYPES, alternating_layers

__all__ = ["plan_layers", "LAYOUT_HELP", "AUTO_LAYOUTS"]

LAYOUT_HELP = (
    "'alternating' (SpikingBrain-7B: GLA on even layers, SWA on odd ones, the first layer GLA), "
    "'parallel' (SpikingBrain-76B: GLA in parallel with SWA in every layer; --full-layers get GLA in parallel "
    "with full attention), "
    "'L:S' ratios such as '3:1' (3 GLA layers then 1 SWA layer, repeated), "
    "'full' (every layer keeps softmax attention: an exact copy of the source), "
    "'auto' (GLA in the layers whose conversion costs least, measured on the source: held-out KL and a "
    "pass-key probe; SWA elsewhere), 'auto-parallel' (GLA in parallel with every layer; with auto full layers "
    "chosen by the probe), "
    "or an explicit comma-separated list with one mixer per layer (e.g. 'gla,swa,full,...')"
)
#: Layouts chosen by measuring the source model (``convert.selection``).
AUTO_LAYOUTS = ("auto", "auto-parallel")


def _ratio(layout: str, num_layers: int) -> list[str]:
    try:
        linear, softmax = (int(part) for part in layout.split(":"))
    except ValueError:
        raise ValueError(f"layout {layout!r}: a ratio is two whole numbers 'L:S', e.g. '3:1'") from None
    if linear < 0 or softmax < 0 or linear + softmax == 0:
        raise ValueError(f"layout {layout!r}: L and S must be >= 0 and not both 0")
    period = ["gla"] * linear + ["swa"] * softmax
    return [period[i % len(period)] for i in range(num_layers)]


def plan_layers(num_layers: int, layout: str | list[str] = "alternating", full_layers: list[int] = ()) -> list[str]:
    """The mixer of each of ``num_layers`` layers for a layout; ``full_layers`` (0-indexed) get full attention
    (``full``, or ``parallel-full`` where the layer is a parallel hybrid)."""
    if isinstance(layout, (list, tuple)) or "," in layout:
        mixers = [m.strip() for m in (layout.split(",") if isinstance(layout, str) else layout)]
        if len(mixers) != num_layers:
            raise ValueError(f"layout lists {len(mixers)} mixers but the source model has {num_layers} layers; give one per layer")
    elif layout == "alternating":
        mixers = alternating_layers(num_layers)
    elif layout == "parallel":
        mixers = ["parallel-swa"] * num_layers
    elif layout in MIXER_TYPES:
        mixers = [layout] * num_layers
    elif ":" in layout:
        mixers = _ratio(layout, num_layers)
    else:
        raise ValueError(f"unknown layout {layout!r}; use {LAYOUT_HELP}")
    unknown = sorted({m for m in mixers if m not in MIXER_TYPES})
    if unknown:
        raise ValueError(f"layout names unknown mixers {unknown}; use one of {list(MIXER_TYPES)}")
    missing = sorted(i for i in full_layers if not 0 <= i < num_layers)
    if missing:
        raise ValueError(f"full-attention layers {missing} do not exist: the model has layers 0..{num_layers - 1}")
    full = set(full_layers)
    return [("parallel-full" if m.startswith("parallel") else "full") if i in full else m for i, m in enumerate(mixers)]
