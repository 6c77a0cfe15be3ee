"""Loading the configured model: the bundle, at the most faithful precision tier that fits the memory."""

from __future__ import annotations

import logging
from dataclasses import replace

from .bundle import load_bundle
from .config import Config
from .memory import MB, choose_plan, read_budget
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def with_model_defaults(config: Config) -> Config:
    """The config with the bundle's recommended steps, guidance and scheduler (its edge.json) as the
    defaults for jobs that leave them out: a 1-step turbo model should not run 20 steps."""
    bundle = load_bundle(config.model.path, config.model.decoder)
    return replace(config, defaults=bundle.job_defaults(config.defaults))


def load_pipeline(config: Config) -> Pipeline:
    """The configured bundle at the most faithful precision tier that fits the memory budget."""
    bundle = load_bundle(config.model.path, config.model.decoder)
    headroom = config.memory.headroom_mb * MB
    plan = choose_plan(bundle, read_budget(headroom), config.model.precision, config.lora.cache_sessions)
    log.info("precision tier %s: %s; LoRA sessions cached: %s", plan.tier, plan.reason, plan.lora.reason)
    return Pipeline(bundle, config.runtime, plan, headroom, config.lora)
