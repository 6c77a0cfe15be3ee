"""Loading the configured model: the bundle, at the most faithful precision tier that fits the memory."""

from __future__ import annotations

import logging
from dataclasses import fields, replace

from .bundle import Bundle, load_bundle
from .config import Config
from .jobs import Defaults
from .memory import MB, choose_plan, read_budget
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def model_defaults(config: Config, bundle: Bundle) -> tuple[Defaults, dict[str, str]]:
    """The defaults for jobs on this model, and where each came from. A job's own field wins over
    all of them; below it a value the user's config sets ("config"), then the bundle's recommendation
    (its "edge.json": a 1-step turbo model should not run 20 steps), then the "built-in" default."""
    set_by_user = {f.name for f in fields(Defaults) if f"defaults.{f.name}" in config.given}
    recommended = {k: v for k, v in bundle.recommended.items() if k not in set_by_user}
    sources = {f.name: "config" if f.name in set_by_user else "edge.json" if f.name in recommended else "built-in"
               for f in fields(Defaults)}
    return replace(config.defaults, **recommended), sources


def with_model_defaults(config: Config) -> Config:
    """The config whose ``defaults`` are :func:`model_defaults` for the configured bundle."""
    defaults, _ = model_defaults(config, load_bundle(config.model.path, config.model.decoder))
    return replace(config, defaults=defaults)


def load_pipeline(config: Config) -> Pipeline:
    """The configured bundle at the most faithful precision tier that fits the memory budget."""
    bundle = load_bundle(config.model.path, config.model.decoder)
    headroom = config.memory.headroom_mb * MB
    plan = choose_plan(bundle, read_budget(headroom), config.model.precision, config.lora.cache_sessions)
    log.info("precision tier %s: %s; LoRA sessions cached: %s", plan.tier, plan.reason, plan.lora.reason)
    return Pipeline(bundle, config.runtime, plan, headroom, config.lora)
