"""A ``Chunk``: what one pipeline rank holds as one of its virtual stages (see :mod:`megatron_dsv3.parallel.placement`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """One chunk: what pipeline rank ``pp_rank`` holds as its virtual stage ``vp_stage``."""

    pp_rank: int
    vp_stage: int
    stage: int  # position of the chunk's stage in model order (0 holds the embedding)
    decoders: tuple[int, ...]  # 0-based global decoder-layer ids
    embedding: bool = False  # Megatron's pre_process
    mtp: int = 0  # MTP layers on this chunk
    loss: bool = False  # final norm, output head and loss: Megatron's post_process
    mirror: bool = False  # DualPipe's second copy of a stage (its weights equal the first copy's)

    @property
    def direction(self) -> int:
        """DualPipe: 0 for the micro-batches entering at rank 0, 1 for those entering at the last rank."""
        return 1 if self.mirror else 0

    def describe(self, first_k_dense: int = 0) -> str:
        parts = ["embedding"] if self.embedding else []
        if self.decoders:
            first, last = self.decoders[0], self.decoders[-1]
            dense = sum(1 for i in self.decoders if i < first_k_dense)
            span = f"decoder {first}" if first == last else f"decoders {first}-{last}"
            if dense:
                span += " (dense)" if dense == len(self.decoders) else f" ({dense} dense)"
            parts.append(span)
        if self.mtp:
            parts.append("mtp" if self.mtp == 1 else f"mtp x{self.mtp}")
        if self.loss:
            parts.append("output head + loss")
        text = ", ".join(parts) or "(empty)"
        return f"{text} (mirror)" if self.mirror else text
