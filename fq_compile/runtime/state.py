"""Runtime state of a plan in this process, kept off the QuantPlan (which stays plain data that
can be saved, compared and shared).

    reports         one GraphReport per graph the flattenquant backend rewrote (explain() reads them)
    device_tensors  plan tensors copied to a device once and shared by every graph and recompile
    constants       derived per-group op constants (built once per plan, copied once per device)

The state lives as long as its plan: it is keyed by the plan's identity and dropped when the plan
is garbage-collected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


@dataclass
class PlanState:
    reports: list = field(default_factory=list)
    device_tensors: dict = field(default_factory=dict)
    constants: dict = field(default_factory=dict)


_STATES: dict[int, PlanState] = {}


def state_of(plan) -> PlanState:
    """The runtime state of `plan` (created on first use)."""
    key = id(plan)
    st = _STATES.get(key)
    if st is None:
        st = _STATES[key] = PlanState()
        weakref.finalize(plan, _STATES.pop, key, None)
    return st


def reports(plan) -> list:
    """The GraphReports of every graph compiled with `plan` in this process, in order."""
    return state_of(plan).reports


def device_tensor(plan, key: str, t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`, copied at most once per (plan, key, device) and shared by all graphs."""
    device = torch.device(device)
    if t.device == device:
        return t
    cache = state_of(plan).device_tensors
    k = (key, str(device))
    hit = cache.get(k)
    if hit is None or hit[0]() is not t:          # a plan tensor replaced since (GPTQ): copy anew
        hit = cache[k] = (weakref.ref(t), t.to(device))
    return hit[1]


def plan_tensors(plan) -> list[torch.Tensor]:
    """Every tensor the compiled graphs read from the plan (device copies included)."""
    out = [copy for _, copy in state_of(plan).device_tensors.values()]
    for lp in plan.layers.values():
        out.append(lp.weight_q)
        if lp.bias is not None:
            out.append(lp.bias)
    return out
