"""Memory tiers: how much memory this process may use, and which model variants fit in it.

The budget is the smallest of MemAvailable (/proc/meminfo) and what the service's cgroup v2
still allows (``memory.max`` and ``memory.high`` minus ``memory.current``), less a configured
headroom for the OS, the front ends and activation spikes. Swapping a diffusion model to an SD
card is death by a thousand page faults, so a plan that does not fit is refused, not tried.

Tiers, most faithful first; each picks per component the first variant the bundle has:

    fp32         fp32                      all components resident
    fp16         fp16, fp32                all resident
    int8         int8, fp16, fp32          all resident
    int8-lowmem  int8, fp16, fp32          one component in memory at a time, CFG passes one
                                           after the other, ONNX Runtime's arena off, freed
                                           blocks returned to the kernel at once

A component's footprint is its peak RSS measured by ``edge-imagegen profile`` (variants.json);
without a measurement it is estimated as twice the bytes the model loads (the graph file and the
external-data files it names: weights plus ONNX Runtime's pre-packed copies and activations),
and the plan says so.

The plan also budgets the LoRA session cache (:mod:`edge.lora_apply`): a cached LoRA set holds its
own UNet and text encoder sessions, weights and pre-packed copies (about twice the bytes of each FP32
model; the activations are the base sessions', only one session runs at a time), so as many sets are kept
as ``lora.cache_sessions`` asks and the budget left beyond the tier's footprint holds; on a bundle
whose UNet is GBs that is often none, and a LoRA job then builds its sessions and releases them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from .bundle import COMPONENTS, OPTIONAL_COMPONENTS, Bundle
from .errors import MemoryBudgetError
from .lora import LORA_COMPONENTS
from .onnx_files import model_bytes
from .variants import read_manifest

log = logging.getLogger(__name__)

TIERS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "fp16": ("fp16", "fp32"),
    "int8": ("int8", "fp16", "fp32"),
    "int8-lowmem": ("int8", "fp16", "fp32"),
}
ESTIMATE_FACTOR = 2
MB = 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LEAN_MMAP_THRESHOLD = 256 * 1024


@dataclass(frozen=True)
class Budget:
    mem_available: int
    cgroup_room: int | None  # what memory.max / memory.high still allow, if limited
    headroom: int

    @property
    def bytes(self) -> int:
        room = self.mem_available if self.cgroup_room is None else min(self.mem_available, self.cgroup_room)
        return max(0, room - self.headroom)

    def describe(self) -> str:
        cgroup = "no cgroup limit" if self.cgroup_room is None else f"cgroup allows {self.cgroup_room // MB} MB"
        return (f"{self.bytes // MB} MB (MemAvailable {self.mem_available // MB} MB, {cgroup}, "
                f"headroom {self.headroom // MB} MB)")


@dataclass(frozen=True)
class LoraCache:
    """How many LoRA sets keep their sessions between jobs, and what one costs."""

    sets: int
    set_bytes: int  # the UNet and text encoder sessions of one set
    reason: str


@dataclass(frozen=True)
class Plan:
    tier: str
    precisions: dict[str, str]  # component -> variant
    footprint: int  # bytes needed at peak
    lowmem: bool
    measured: bool  # False: footprints estimated from file sizes
    reason: str
    lora: LoraCache | None = None  # None: not chosen from a budget (lora.cache_sessions as configured)


def fixed_plan(precisions: dict[str, str] | None = None, reason: str = "asked for") -> Plan:
    """A plan that is not chosen from the budget: every component resident, at the given
    precision (FP32 where not given). Quantization, profiling and tests run these."""
    full = {c: (precisions or {}).get(c, "fp32") for c in COMPONENTS}
    full.update({c: p for c, p in (precisions or {}).items() if c in OPTIONAL_COMPONENTS})
    tier = "fp32" if set(full.values()) == {"fp32"} else "custom"
    return Plan(tier, full, 0, False, False, reason)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_room(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the process's cgroup v2 still allows (the tightest of memory.max and memory.high
    along the path to the root), or None without a limit or without cgroup v2."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    room = None
    group = cgroup_fs / rel.lstrip("/")
    while True:
        current = _read_int(group / "memory.current") or 0
        for name in ("memory.max", "memory.high"):
            limit = _read_int(group / name)
            if limit is not None:
                room = limit - current if room is None else min(room, limit - current)
        if group == cgroup_fs or cgroup_fs not in group.parents:
            break
        group = group.parent
    return None if room is None else max(0, room)


def mem_available(proc: Path = Path("/proc")) -> int:
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise MemoryBudgetError(f"{proc / 'meminfo'}: no MemAvailable line (Linux 3.14 or newer needed)")


def read_budget(headroom: int, proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> Budget:
    return Budget(mem_available(proc), cgroup_room(proc, cgroup_fs), headroom)


def load_manifest(bundle: Bundle) -> dict:
    return read_manifest(bundle.root)


def footprint(bundle: Bundle, manifest: dict, component: str, precision: str,
              lowmem: bool = False) -> tuple[int, bool]:
    """(bytes, measured) for one component variant, run resident or the lowmem tier's way."""
    entry = manifest.get("components", {}).get(component, {}).get(precision, {})
    if bundle.components[component].folder != bundle.root / component:
        entry = {}  # a model.decoder folder: variants.json measured the bundle's own decoder
    for key in ("lowmem_peak_rss_bytes", "peak_rss_bytes") if lowmem else ("peak_rss_bytes",):
        if isinstance(entry.get(key), int):
            return entry[key], True
    return model_bytes(bundle.components[component].variants[precision]) * ESTIMATE_FACTOR, False


def tier_plan(bundle: Bundle, manifest: dict, tier: str) -> Plan:
    precisions = {}
    for comp in bundle.components:  # the optional vae_encoder too, where the bundle has one
        variants = bundle.components[comp].variants
        precisions[comp] = next(p for p in TIERS[tier] if p in variants)
    lowmem = tier == "int8-lowmem"
    sizes = [footprint(bundle, manifest, c, p, lowmem) for c, p in precisions.items()]
    need = max(s for s, _ in sizes) if lowmem else sum(s for s, _ in sizes)
    return Plan(tier, precisions, need, lowmem, all(m for _, m in sizes), "")


def lora_set_bytes(bundle: Bundle, manifest: dict, precisions: dict[str, str],
                   components: tuple[str, ...] = LORA_COMPONENTS) -> int:
    """What the sessions of one LoRA set hold: per changed component at most twice its FP32 file (ONNX
    Runtime folds FP16 casts and INT8 dequantization of weights it has no kernel for into FP32
    constants: 20.1 and 19.2 MB a set on the embedded model against 23.2 MB for FP32), and at most
    the variant's measured peak where ``profile`` measured one."""
    total = 0
    for c in components:
        bound = model_bytes(bundle.components[c].variants["fp32"]) * ESTIMATE_FACTOR
        peak, measured = footprint(bundle, manifest, c, precisions[c])
        total += min(peak, bound) if measured else bound
    return total


def lora_cache(bundle: Bundle, manifest: dict, plan: Plan, budget: Budget, wanted: int) -> LoraCache:
    """As many of ``wanted`` cached LoRA sets as the budget left beyond the plan's footprint holds."""
    set_bytes = lora_set_bytes(bundle, manifest, plan.precisions)
    if plan.lowmem:
        return LoraCache(0, set_bytes, "none: the int8-lowmem tier builds its sessions per use")
    spare = max(0, budget.bytes - plan.footprint)
    sets = min(wanted, spare // set_bytes)
    return LoraCache(sets, set_bytes, f"{sets} of lora.cache_sessions {wanted}: {set_bytes // MB} MB a set, "
                                      f"{spare // MB} MB of the budget left beyond the {plan.tier} tier")


def choose_plan(bundle: Bundle, budget: Budget, requested: str = "auto", lora_sets: int = 0) -> Plan:
    """The most faithful tier that fits the budget (``auto``), or the requested one if it fits, with
    room for up to ``lora_sets`` cached LoRA sets where the rest of the budget holds them."""
    manifest = load_manifest(bundle)
    candidates = list(TIERS) if requested == "auto" else [requested]
    plans = [tier_plan(bundle, manifest, tier) for tier in candidates]
    for plan in plans:
        if plan.footprint <= budget.bytes:
            how = "measured" if plan.measured else "estimated from file sizes; run `edge-imagegen profile`"
            reason = (f"{plan.tier} needs {plan.footprint // MB} MB ({how}); budget {budget.describe()}"
                      + (" (asked for)" if requested != "auto" else ""))
            return Plan(plan.tier, plan.precisions, plan.footprint, plan.lowmem, plan.measured, reason,
                        lora_cache(bundle, manifest, plan, budget, lora_sets))
    smallest = min(plans, key=lambda p: p.footprint)
    raise MemoryBudgetError(
        f"model.precision: the {smallest.tier} tier of {bundle.root} needs {smallest.footprint // MB} MB "
        f"but the memory budget is {budget.describe()}; free memory, raise the service's MemoryMax, lower "
        f"memory.headroom_mb, or use a smaller model")


def ensure_room_for_job(plan: Plan, headroom: int) -> None:
    """Before a job: resident tiers already hold their weights, so only the headroom must still be
    free; the lowmem tier loads its largest component again and needs that much on top."""
    budget = read_budget(headroom)
    need = plan.footprint if plan.lowmem else 0
    if budget.bytes < need or budget.bytes == 0:
        raise MemoryBudgetError(f"not enough free memory to start the job now: the {plan.tier} tier needs "
                                f"{need // MB} MB beyond the headroom; budget {budget.describe()}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def lean_malloc() -> None:
    """Make glibc give freed blocks back to the kernel instead of keeping them for reuse.

    With ONNX Runtime's arena off, activations come from malloc. glibc raises its mmap threshold
    after each large free (up to 32 MB), so later blocks land in the heap, and a heap fragmented by
    one UNet call stays resident at its peak: 440 of 930 MB of anonymous memory on the SD-1.5 UNet
    (benchmarks/README.md). A fixed threshold of 256 KB maps each large block on its own and
    unmaps it when freed. Process-wide, so only the lowmem tier asks for it; no-op without glibc.
    """
    libc = _libc()
    if libc is None or not libc.mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD):
        log.debug("mallopt unavailable: freed memory stays with the allocator")


def trim_heap() -> None:
    """Return the heap's free pages to the kernel (after a model was released)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
