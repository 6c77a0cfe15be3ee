"""The memory plan budgets the LoRA session cache: real sessions of the embedded model."""

import weakref

import numpy as np
import pytest

from edge.bundle import EMBEDDED_MODEL, load_bundle
from edge.config import LoraConfig
from edge.errors import MemoryBudgetError
from edge.jobs import LoraRef, parse_job
from edge.memory import Budget, choose_plan, load_manifest, lora_set_bytes, tier_plan
from edge.onnx_files import model_bytes
from edge.pipeline import Pipeline
from edge.providers import RuntimeOptions
from lora_files import KNOLLING_MODULES, random_kohya_lora

BUNDLE = load_bundle(EMBEDDED_MODEL)
ONE = RuntimeOptions(threads=1)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate("abc"):
        random_kohya_lora(folder / f"{name}.safetensors", KNOLLING_MODULES, seed=seed, size=4.0)
    return folder


MANIFEST = load_manifest(BUNDLE)


def budget_for(tier: str, sets: float) -> Budget:
    """A budget with room for the tier and ``sets`` LoRA sets beyond it."""
    plan = tier_plan(BUNDLE, MANIFEST, tier)
    return Budget(plan.footprint + int(sets * lora_set_bytes(BUNDLE, MANIFEST, plan.precisions)), None, 0)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_a_set_costs_twice_the_fp32_files_or_the_measured_peak_if_smaller(precision):
    fp32 = {c: 2 * model_bytes(BUNDLE.components[c].variants["fp32"]) for c in ("unet", "text_encoder")}
    both = {"unet": precision, "text_encoder": precision}
    assert lora_set_bytes(BUNDLE, {}, both) == sum(fp32.values())  # nothing measured
    peaks = {c: MANIFEST["components"][c][precision]["peak_rss_bytes"] for c in fp32}
    assert lora_set_bytes(BUNDLE, MANIFEST, both) == sum(min(fp32[c], peaks[c]) for c in fp32)
    small = {"components": {c: {precision: {"peak_rss_bytes": 1000}} for c in fp32}}
    assert lora_set_bytes(BUNDLE, small, both) == 2000


@pytest.mark.parametrize("tier, room, wanted, sets", [
    ("fp32", 2.5, 3, 2),  # the budget holds two and a half: two
    ("fp32", 2.5, 1, 1),  # lora.cache_sessions is the most
    ("fp32", 0.9, 2, 0),  # not one: none cached
    ("int8", 5, 4, 4),
    ("int8-lowmem", 5, 2, 0),  # builds per use anyway
])
def test_the_plan_caches_as_many_sets_as_the_budget_beyond_the_tier_holds(tier, room, wanted, sets):
    plan = choose_plan(BUNDLE, budget_for(tier, room), tier, wanted)
    assert plan.tier == tier and plan.lora.sets == sets
    assert f"{sets} of lora.cache_sessions {wanted}" in plan.lora.reason or tier == "int8-lowmem"


def pipeline(loras, sets: float, wanted: int = 4) -> Pipeline:
    plan = choose_plan(BUNDLE, budget_for("fp32", sets), "fp32", wanted)
    return Pipeline(BUNDLE, ONE, plan, lora=LoraConfig(dir=str(loras), cache_sessions=wanted))


def test_a_budget_for_two_sets_keeps_two_and_evicts_the_oldest(loras):
    pipe = pipeline(loras, 2.5)
    assert pipe.lora.cache_sets == 2
    built = {}
    for name in "abc":
        pipe.lora.activate((LoraRef(name, 0.8),))
        built[name] = weakref.ref(pipe.unet._session)
        assert pipe.unet._session is not pipe.unet._base
    assert len(pipe.lora._sessions) == 2
    assert built["a"]() is None  # the oldest went, and ONNX Runtime with it
    pipe.lora.activate((LoraRef("b", 0.8),))
    assert pipe.unet._session is built["b"]()  # cached: the same session again
    pipe.lora.activate(())
    assert pipe.unet._session is pipe.unet._base and len(pipe.lora._sessions) == 2


def test_a_budget_with_no_room_builds_without_caching_and_releases(loras):
    pipe = pipeline(loras, 0.5)
    assert pipe.lora.cache_sets == 0
    job = {"prompt": "knolling of 3 red gears", "steps": 2, "seed": 3}
    base = np.asarray(pipe.generate(parse_job(job)).images[0].image)
    styled = np.asarray(pipe.generate(parse_job({**job, "loras": [{"name": "a", "strength": 1.0}]})).images[0].image)
    assert not np.array_equal(styled, base)  # the LoRA ran
    assert not pipe.lora._sessions and pipe.unet._session is pipe.unet._base  # and its sessions went
    assert pipe.text_encoder._session is pipe.text_encoder._base


def test_the_live_budget_frees_the_cache_then_fails_with_the_figures(loras):
    pipe = pipeline(loras, 2.5)
    pipe.lora.activate((LoraRef("a", 0.8),))
    pipe.headroom = 10**15  # no machine has this much free
    with pytest.raises(MemoryBudgetError, match=r"sessions of this LoRA set: they need \d+ MB beyond the headroom"):
        pipe.lora.activate((LoraRef("b", 0.8),))
    assert not pipe.lora._sessions

