"""What the KV cache holds right now, per device: the chat window's status line."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.engine.planner.plan import Plan


@dataclass(frozen=True, slots=True)
class KvStatus:
    used: int  # cells holding tokens
    n_ctx: int
    shifts: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    device_bytes: dict[str, int] = field(default_factory=dict)  # bytes in use per device
    gen_tok_s: float = 0.0

    @property
    def fill(self) -> float:
        return self.used / self.n_ctx if self.n_ctx else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "used": self.used,
            "n_ctx": self.n_ctx,
            "fill": round(self.fill, 4),
            "shifts": self.shifts,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "device_bytes": self.device_bytes,
            "gen_tok_s": round(self.gen_tok_s, 2),
        }


def kv_status(
    plan: Plan | None, used: int, n_ctx: int, shifts: int = 0, gen_tok_s: float = 0.0
) -> KvStatus:
    """KV status from the load's plan: each device's cache fills in proportion to the cells
    in use (every layer stores every cell)."""
    if plan is None:
        return KvStatus(used, n_ctx, shifts, gen_tok_s=gen_tok_s)
    share = used / n_ctx if n_ctx else 0.0
    per = {d.name: int(u.kv * share) for d, u in zip(plan.devices, plan.usage, strict=True)}
    if plan.host.kv:
        per["host"] = int(plan.host.kv * share)
    return KvStatus(used, n_ctx, shifts, plan.settings.type_k, plan.settings.type_v, per, gen_tok_s)
