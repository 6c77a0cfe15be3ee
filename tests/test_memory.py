"""Tier choice on simulated machines: fake /proc/meminfo, /proc/self/cgroup and cgroup v2 files."""

import json
import subprocess
import sys

import pytest

from edge.bundle import load_bundle
from edge.errors import MemoryBudgetError
from edge.memory import MB, Budget, _libc, cgroup_room, choose_plan, read_budget, tier_plan


def fake_machine(tmp_path, mem_available_mb, limits=None, current_mb=0):
    """limits: {relative cgroup path: (memory.max, memory.high)} with "max" for none."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 8000000 kB\nMemAvailable: {mem_available_mb * 1024} kB\n")
    cg = tmp_path / "cgroup"
    leaf = "/system.slice/edge-imagegen.service"
    (proc / "self" / "cgroup").write_text(f"0::{leaf}\n")
    (cg / leaf.lstrip("/")).mkdir(parents=True)
    for rel, (mx, high) in (limits or {}).items():
        d = cg / rel.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(f"{mx}\n")
        (d / "memory.high").write_text(f"{high}\n")
        (d / "memory.current").write_text(f"{current_mb * MB}\n")
    return proc, cg


def manifest_with(bundle_copy, rss_mb):
    """variants.json with chosen footprints: {component: {precision: MB}}."""
    comps = {c: {p: {"peak_rss_bytes": mb * MB} for p, mb in v.items()} for c, v in rss_mb.items()}
    (bundle_copy / "variants.json").write_text(json.dumps({"version": 1, "components": comps}))
    return load_bundle(bundle_copy)


RSS = {"text_encoder": {"fp32": 500, "fp16": 260, "int8": 150},
       "unet": {"fp32": 3500, "fp16": 1800, "int8": 950},
       "vae_decoder": {"fp32": 400, "fp16": 220, "int8": 200},
       "vae_encoder": {"fp32": 100, "fp16": 60, "int8": 40}}


def test_budget_without_cgroup_limit(tmp_path):
    proc, cg = fake_machine(tmp_path, 6000)
    budget = read_budget(256 * MB, proc, cg)
    assert budget.cgroup_room is None and budget.bytes == (6000 - 256) * MB


def test_budget_takes_tightest_cgroup_limit_up_the_tree(tmp_path):
    proc, cg = fake_machine(tmp_path, 6000, {
        "/system.slice": ("max", 3000 * MB),
        "/system.slice/edge-imagegen.service": (2500 * MB, "max"),
    }, current_mb=100)
    assert cgroup_room(proc, cg) == 2400 * MB  # memory.max minus memory.current
    assert read_budget(0, proc, cg).bytes == 2400 * MB


def test_no_cgroup_v2(tmp_path):
    proc, cg = fake_machine(tmp_path, 1000)
    (proc / "self" / "cgroup").write_text("12:memory:/legacy\n")
    assert cgroup_room(proc, cg) is None


@pytest.mark.parametrize("budget_mb, tier, precisions", [
    (8000, "fp32", ("fp32",) * 4),
    (4000, "fp16", ("fp16",) * 4),
    (1500, "int8", ("int8",) * 4),
    (1000, "int8-lowmem", ("int8",) * 4),
])
def test_auto_picks_most_faithful_tier_that_fits(bundle_copy, budget_mb, tier, precisions):
    bundle = manifest_with(bundle_copy, RSS)
    plan = choose_plan(bundle, Budget(budget_mb * MB, None, 0))
    assert plan.tier == tier and tuple(plan.precisions.values()) == precisions and plan.measured
    assert plan.lowmem == (tier == "int8-lowmem")
    assert tier in plan.reason and f"{budget_mb} MB" in plan.reason


def test_lowmem_needs_only_the_largest_component(bundle_copy):
    bundle = manifest_with(bundle_copy, RSS)
    assert tier_plan(bundle, json.loads((bundle_copy / "variants.json").read_text()), "int8-lowmem").footprint == 950 * MB


def test_lowmem_uses_its_own_measurement_where_profile_made_one(bundle_copy):
    manifest_with(bundle_copy, RSS)
    manifest = json.loads((bundle_copy / "variants.json").read_text())
    manifest["components"]["unet"]["int8"]["lowmem_peak_rss_bytes"] = 700 * MB
    bundle = load_bundle(bundle_copy)
    assert tier_plan(bundle, manifest, "int8-lowmem").footprint == 700 * MB
    assert tier_plan(bundle, manifest, "int8").footprint == (150 + 950 + 200 + 40) * MB  # resident: not affected


def test_nothing_fits_is_a_clear_error(bundle_copy):
    bundle = manifest_with(bundle_copy, RSS)
    with pytest.raises(MemoryBudgetError, match=r"int8-lowmem tier .* needs 950 MB but the memory budget is 500 MB"):
        choose_plan(bundle, Budget(500 * MB, None, 0))


def test_requested_tier_must_fit(bundle_copy):
    bundle = manifest_with(bundle_copy, RSS)
    assert choose_plan(bundle, Budget(8000 * MB, None, 0), "int8").tier == "int8"
    with pytest.raises(MemoryBudgetError, match="fp32 tier"):
        choose_plan(bundle, Budget(2000 * MB, None, 0), "fp32")


def test_missing_variant_falls_back_and_estimates(bundle_copy):
    (bundle_copy / "variants.json").unlink(missing_ok=True)
    for f in (bundle_copy / "unet").glob("model.int8.onnx*"):
        f.unlink()
    plan = choose_plan(load_bundle(bundle_copy), Budget(10**12, None, 0), "int8")
    assert plan.precisions["unet"] == "fp16" and plan.precisions["text_encoder"] == "int8"
    assert not plan.measured and "estimated from file sizes" in plan.reason


def test_job_refused_when_memory_ran_out(pipeline):
    from edge.errors import MemoryBudgetError
    from edge.jobs import parse_job
    from edge.pipeline import Pipeline
    huge = Pipeline(pipeline.bundle, pipeline.runtime, pipeline.plan, headroom=2**50)
    with pytest.raises(MemoryBudgetError, match="not enough free memory to start the job"):
        huge.generate(parse_job({"prompt": "a gear", "seed": 1, "steps": 1}))


FRAGMENT = r"""
import sys, numpy as np
from edge.memory import lean_malloc, trim_heap
def anon_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) // 1024
if sys.argv[1] == "lean":
    lean_malloc()
np.ones(2 * 2**20)  # a 16 MB block, freed at once: glibc's dynamic threshold rises to 16 MB
base = anon_mb()
blocks = [np.ones(2**19) for _ in range(48)]  # 48 x 4 MB, like one UNet call's activations
last = blocks.pop()  # still in use, on top of the heap: nothing below it can be trimmed
del blocks
if sys.argv[1] == "trim":
    trim_heap()
print(anon_mb() - base)
"""


@pytest.mark.skipif(_libc() is None, reason="needs glibc's mallopt")
def test_lean_malloc_gives_freed_activations_back():
    held = {mode: int(subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "lean", "trim")}
    assert held["default"] > 120  # the mechanism is real: the heap keeps what was freed below the top
    assert held["lean"] < 16 and held["trim"] < 16, held
