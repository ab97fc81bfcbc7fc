"""Where ``indexer_precision="fp8"`` was applied, and where not and why (one record per F-layer indexer).

fp8 scoring exists only inside the fused CUDA kernel (``fuse/kernels/indexer_fp8.py``). A layer that keeps
Inductor's scoring (CPU, ``fuse_indexer_kernel=False``, a refused fusion) or whose inputs the fp8
kernel cannot take scores exactly, in bf16/fp32; its record says so, so a user who asked for fp8 can
see which layers did not get it without reading note strings.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence

from .substitute import FusionRecord, site_name

BF16, FP8 = "bf16", "fp8"


class Fp8NotApplied(str, enum.Enum):
    """Why an F layer scores exactly although fp8 was asked for."""

    NOT_CUDA = "the indexer runs off CUDA; fp8 scoring exists only in the fused CUDA kernel"
    FUSION_OFF = "fuse_indexer_kernel is off; fp8 scoring exists only in the fused kernel"
    FUSION_REFUSED = "the fused kernel was refused at this site"
    FP8_UNSUPPORTED = "the fp8 kernel cannot take this site's inputs; the bf16 fused kernel runs"


@dataclasses.dataclass(frozen=True)
class PrecisionRecord:
    """How one F layer's indexer scores: ``applied`` is ``requested`` or "bf16" with ``reason``."""

    site: str
    layer: int | None
    requested: str
    applied: str
    reason: Fp8NotApplied | None = None
    detail: str = ""  # the fusion's or the fp8 kernel's own refusal, where there is one

    def note(self) -> str:
        if self.reason is None:
            return f"{self.site}: scores in {self.applied}"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.site}: {self.requested} scoring not applied, exact {self.applied}: {self.reason.value}{extra}"


def precision_records(
    requested: str,
    live_sites: Sequence,
    fusions: Iterable[FusionRecord],
    *,
    fusion_enabled: bool,
    on_cuda: Callable[[object], bool],
) -> list[PrecisionRecord]:
    """One record per live F site when ``requested`` is not "bf16" (none otherwise).

    ``fusions``: the substitution's records for the sites ``on_cuda`` admits, in ``live_sites``' order
    (empty when ``fusion_enabled`` is false).
    """
    if requested == BF16:
        return []
    pending = iter(fusions)
    rows = []
    for site in live_sites:
        name, layer = site_name(site)
        if not on_cuda(site):
            rows.append(PrecisionRecord(name, layer, requested, BF16, Fp8NotApplied.NOT_CUDA))
            continue
        if not fusion_enabled:
            rows.append(PrecisionRecord(name, layer, requested, BF16, Fp8NotApplied.FUSION_OFF))
            continue
        fusion = next(pending)
        if not fusion.fused:
            rows.append(PrecisionRecord(name, layer, requested, BF16, Fp8NotApplied.FUSION_REFUSED, fusion.detail))
        elif fusion.precision != requested:
            rows.append(PrecisionRecord(name, layer, requested, fusion.precision, Fp8NotApplied.FP8_UNSUPPORTED,
                                        fusion.fp8_refusal or ""))
        else:
            rows.append(PrecisionRecord(name, layer, requested, fusion.precision))
    return rows
