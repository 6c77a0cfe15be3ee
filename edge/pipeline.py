"""Text to image: CLIP tokenizer -> text encoder -> UNet denoising loop -> VAE decoder.

Edit jobs (image to image, inpainting, instruction editing; :mod:`edge.editing`) add the VAE
encoder before the loop and start it elsewhere. The whole denoising loop is
:meth:`Pipeline._denoise`. Tensor names, dtypes and static shapes come from the ONNX sessions
(:class:`OnnxModel`), so exports that use int32 ids, int64 timesteps or float16 weights run unchanged.

Initial noise: ``numpy.random.Generator(PCG64(seed)).standard_normal(shape)`` in float64, then
cast to float32. PCG64 and numpy's ziggurat are specified bit for bit, and drawing in float64
before rounding hides last-ulp differences of libm between x86-64 and ARM64, so a seed gives the
same latents on both. Image ``k`` of a job uses seed ``seed + k``.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from . import editing, schedulers
from .bundle import COMPONENTS, Bundle
from .errors import BundleError, CancelledError, ValidationError
from .config import LoraConfig
from .jobs import Job, Step
from .lora_apply import LoraLibrary, LoraRuntime
from .memory import Plan, ensure_room_for_job, fixed_plan, lean_malloc, read_budget, trim_heap
from .providers import RuntimeOptions, make_session
from .tiling import choose_tile, decode_tiled
from .tokenizer import ClipTokenizer
from .vocabulary import prompt_warning

log = logging.getLogger(__name__)

ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass
class GeneratedImage:
    seed: int
    image: Image.Image


@dataclass
class Result:
    job: Job
    images: list[GeneratedImage]
    width: int
    height: int
    scheduler: str
    sampler: str
    tokens_dropped: dict[str, int]
    timings: dict[str, float | list[float]] = field(default_factory=dict)
    lora_hashes: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the file used
    warnings: list[str] = field(default_factory=list)  # for the user: e.g. a prompt the model cannot read
    parameters: dict[str, str] = field(default_factory=dict)  # edit settings for the PNG, A1111's names


@dataclass(frozen=True)
class Port:
    """A session input's name, ONNX type and shape, copied out of the session: onnxruntime's own
    NodeArg objects keep their session, and so all its weights, alive."""

    name: str
    type: str
    shape: tuple


class OnnxModel:
    """One ONNX model plus what its inputs expect, read from the session itself.

    Resident models keep their session; the others (the int8-lowmem tier) hold it only inside
    ``with model.loaded():`` so that one component at a time is in memory.
    """

    def __init__(self, name: str, path: Path, runtime: RuntimeOptions, resident: bool = True):
        self.name, self.path, self.runtime = name, path, runtime
        session = make_session(path, runtime, name)
        self.inputs = {i.name: Port(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()}
        self.output = session.get_outputs()[0].name
        self.providers = session.get_providers()
        self._base = self._session = session if resident else None
        self._resident = resident
        self._overrides: dict[str, np.ndarray] | None = None  # lowmem: what the next load overrides (LoRA)
        self.record: list[dict[str, np.ndarray]] | None = None  # set to a list to capture inputs (calibration)

    @contextmanager
    def loaded(self) -> Iterator[None]:
        if self._resident or self._session is not None:
            yield
            return
        self._session = make_session(self.path, self.runtime, self.name, self._overrides)
        try:
            yield
        finally:
            self._session = None  # the only reference: ONNX Runtime frees the weights here
            trim_heap()

    def new_session(self, initializers: dict[str, np.ndarray]) -> object:
        return make_session(self.path, self.runtime, self.name, initializers)

    def use(self, session: object | None) -> None:
        """Resident: run with ``session`` (LoRA weights fused in); None: the file's own weights."""
        self._session = session if session is not None else self._base

    def override(self, initializers: dict[str, np.ndarray] | None) -> None:
        """Not resident: the initializers the next load overrides (LoRA weights); None: none."""
        self._overrides = initializers

    def input(self, index: int) -> Port:
        return list(self.inputs.values())[index]

    def dtype(self, name: str) -> type:
        onnx_type = self.inputs[name].type
        if onnx_type not in ONNX_DTYPES:
            raise BundleError(f"{self.name}: input {name} has unsupported type {onnx_type}")
        return ONNX_DTYPES[onnx_type]

    def shape(self, name: str) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in self.inputs[name].shape]

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        assert self._session is not None, f"{self.name}: call inside `with model.loaded()`"
        feeds = {k: np.asarray(v, dtype=self.dtype(k), order="C") for k, v in feeds.items()}  # keeps 0-d scalars 0-d
        if self.record is not None:
            self.record.append(feeds)
        out = self._session.run([self.output], feeds)[0]
        return out.astype(np.float32, copy=False)


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise: drawn in float64, then rounded (see the module docstring)."""
    return rng.standard_normal(shape).astype(np.float32)


class Pipeline:
    """A loaded model, kept resident between jobs. Not thread-safe: one job at a time."""

    def __init__(self, bundle: Bundle, runtime: RuntimeOptions = RuntimeOptions(), plan: Plan | None = None,
                 headroom: int | None = None, lora: LoraConfig = LoraConfig()):
        """``headroom`` (bytes): check before each job that this much memory is still free."""
        self.bundle = bundle
        self.headroom = headroom
        self.plan = plan or fixed_plan(reason="default")
        if self.plan.lowmem:  # batching CFG doubles activations; the arena keeps peaks allocated
            runtime = replace(runtime, cfg_batch=False, memory_arena=False)
            lean_malloc()
        self.runtime = runtime
        t0 = time.perf_counter()
        self.tokenizer = ClipTokenizer.from_dir(bundle.tokenizer_dir)
        self.text_encoder, self.unet, self.vae_decoder = (
            OnnxModel(name, bundle.components[name].variants[self.plan.precisions[name]], runtime,
                      resident=not self.plan.lowmem)
            for name in COMPONENTS)
        encoder = bundle.vae_encoder
        precision = self.plan.precisions.get("vae_encoder", "fp32")
        self.vae_encoder = encoder and OnnxModel(
            "vae_encoder", encoder.variants.get(precision, encoder.path), runtime, resident=not self.plan.lowmem)
        self.load_seconds = time.perf_counter() - t0
        self._ids_name = self.text_encoder.input(0).name
        self._sample, self._timestep, self._context = (self.unet.input(i).name for i in range(3))
        self._latent_name = self.vae_decoder.input(0).name
        self.latent_channels = self.vae_decoder.shape(self._latent_name)[1] or 4
        self.model_kind = editing.model_kind(self.unet.shape(self._sample)[1] or self.latent_channels,
                                             self.latent_channels)
        self.lora = LoraRuntime(self, LoraLibrary.configured(lora, bundle), lora.cache_sessions)
        log.info("loaded %s in %.2f s on %s, tier %s (%s)", bundle.root, self.load_seconds, self.provider,
                 self.plan.tier, ", ".join(f"{c} {p}" for c, p in self.plan.precisions.items()))

    @property
    def precision(self) -> str:
        return self.plan.tier

    @property
    def provider(self) -> str:
        return self.unet.providers[0]

    # --- sizes -------------------------------------------------------------------------------
    def default_size(self) -> tuple[int, int]:
        _, _, h, w = self.unet.shape(self._sample)
        scale = self.bundle.vae_scale
        if h and w:
            return w * scale, h * scale
        side = self.bundle.native_size or 512
        return side, side

    @property
    def fixed_size(self) -> bool:
        """True when the export's UNet has a static latent size (jobs must use default_size)."""
        _, _, h, w = self.unet.shape(self._sample)
        return bool(h and w)

    def size(self, job: Job) -> tuple[int, int]:
        """Width and height for a job: its own, else the model's."""
        default_w, default_h = self.default_size()
        return job.width or default_w, job.height or default_h

    def check(self, job: Job) -> None:
        """What only this model and its scheduler can refuse, checked before a job is accepted:
        the size against the export's static shape, the scheduler's name and its step limits, the
        edit fields against the model (:meth:`edit_kind`)."""
        _, _, h, w = self.unet.shape(self._sample)
        scale = self.bundle.vae_scale
        for field_name, value, static in zip(("width", "height"), self.size(job), (w, h)):
            if static and value != static * scale:
                raise ValidationError(field_name, f"this model was exported with a fixed size of "
                                      f"{w * scale}x{h * scale}; got {value}")
            if value % scale:
                raise ValidationError(field_name, f"must be a multiple of {scale}, got {value}")
        schedulers.from_config(self.bundle.scheduler_config, job.scheduler).set_timesteps(job.steps)
        self.lora.check(job.loras)
        self.edit_kind(job)

    def edit_kind(self, job: Job) -> str:
        """The edit a job asks of this model (:func:`edge.editing.job_kind`); a ValidationError
        names the field this model cannot take (a mask for InstructPix2Pix, no vae_encoder/, ...)."""
        return editing.job_kind(job, self.model_kind, self.vae_encoder is not None)

    # --- stages ------------------------------------------------------------------------------
    def encode(self, ids: list[int]) -> np.ndarray:
        return self.text_encoder(**{self._ids_name: np.asarray([ids], dtype=np.int64)})

    def _timestep_array(self, t: float, batch: int) -> np.ndarray:
        rank = len(self.unet.shape(self._timestep))
        return np.full((batch,) * rank, t)  # rank 0: a scalar; rank 1: one per batch item

    def encode_image(self, pixels: np.ndarray) -> editing.Moments:
        """VAE encoder: (1, 3, H, W) pixels in [-1, 1] -> the latent posterior (call inside ``loaded()``)."""
        output = self.vae_encoder(**{self.vae_encoder.input(0).name: pixels})
        return editing.Moments.from_output(output, self.latent_channels)

    def _predict_noise(self, x: np.ndarray, t: float, guide: editing.Guide) -> np.ndarray:
        def unet(sample: np.ndarray, context: np.ndarray) -> np.ndarray:
            return self.unet(**{self._sample: sample, self._context: context,
                                self._timestep: self._timestep_array(t, len(sample))})

        samples = [x if extra is None else np.concatenate([x, extra], axis=1) for extra in guide.extras]
        if len(samples) > 1 and self.runtime.cfg_batch and self.unet.shape(self._sample)[0] in (None, len(samples)):
            eps = list(unet(np.concatenate(samples), np.concatenate(guide.contexts)))
        else:
            eps = [unet(sample, context)[0] for sample, context in zip(samples, guide.contexts)]
        return guide.combine(eps)[None]

    def _denoise(self, start: editing.Start, job: Job, scheduler, rng: np.random.Generator,
                 report: Callable[[int, float, np.ndarray], None], cancel: threading.Event | None,
                 finish: threading.Event | None) -> tuple[np.ndarray, int]:
        """The latents to decode and the steps run: all of them, or up to a ``finish`` (then the
        last step's denoised estimate, as AUTOMATIC1111's interrupt keeps what is drawn so far)."""
        latents, steps = start.latents, len(scheduler.timesteps) - start.index
        for i in range(start.index, len(scheduler.timesteps)):
            done = i - start.index
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"job {job.id} cancelled before step {done + 1} of {steps}")
            t0 = time.perf_counter()
            x = scheduler.scale_model_input(latents, i)
            eps = self._predict_noise(x, float(scheduler.timesteps[i]), start.guide)
            step_noise = gaussian(rng, latents.shape) if scheduler.needs_noise else None
            latents = scheduler.step(eps, i, latents, step_noise)
            if start.after_step is not None:  # inpainting with an ordinary UNet: the known region back
                latents = start.after_step(latents, i)
            estimate = latents if scheduler.x0 is None else scheduler.x0
            report(done + 1, time.perf_counter() - t0, estimate)
            if finish is not None and finish.is_set() and done + 1 < steps:
                return estimate, done + 1
        return latents, steps

    def decode(self, latents: np.ndarray) -> Image.Image:
        latents = latents / self.bundle.vae_scaling_factor + self.bundle.vae_shift_factor

        def run(z: np.ndarray) -> np.ndarray:
            return self.vae_decoder(**{self._latent_name: z})

        _, _, sh, sw = self.vae_decoder.shape(self._latent_name)
        tile = choose_tile(self.runtime.vae_tiling, self.runtime.vae_tile_size, latents.shape[2:], (sh, sw),
                           self.bundle.vae_scale, self.bundle.vae_channels, self.plan.lowmem,
                           lambda: read_budget(self.headroom or 0).bytes)
        pixels = (decode_tiled(run, latents, tile, self.bundle.vae_scale) if tile else run(latents))[0]
        pixels = np.clip(pixels / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # [-1, 1], AutoencoderTiny's too
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8), "RGB")

    # --- a whole job -------------------------------------------------------------------------
    def generate(self, job: Job, on_step: Callable[[Step], None] | None = None,
                 cancel: threading.Event | None = None, finish: threading.Event | None = None) -> Result:
        """Run a job that :meth:`check` accepted and whose seed is resolved (:func:`edge.jobs.admit`).
        ``cancel`` stops it with no images (CancelledError); ``finish`` ends it at the next step
        with the images drawn so far, the current one from its denoised estimate."""
        if job.seed < 0:
            raise ValidationError("seed", "must be resolved before generation (see jobs.admit)")
        width, height = self.size(job)
        edit = editing.Edit.load(job, self.edit_kind(job), width, height)
        if self.headroom is not None:
            ensure_room_for_job(self.plan, self.headroom)
        self.lora.activate(job.loras)
        try:
            return self._generate(job, edit, width, height, on_step, cancel, finish)
        finally:
            self.lora.release()

    def _generate(self, job: Job, edit: editing.Edit, width: int, height: int, on_step: Callable[[Step], None] | None,
                  cancel: threading.Event | None, finish: threading.Event | None) -> Result:
        scheduler = schedulers.from_config(self.bundle.scheduler_config, job.scheduler)
        timings: dict[str, float | list[float]] = {"steps": []}
        t0 = time.perf_counter()
        # As diffusers: no unconditional pass at guidance <= 1 (InstructPix2Pix: or image guidance < 1).
        use_cfg = job.guidance > 1.0 and (edit.kind != "instruct" or edit.image_guidance >= 1.0)
        prompt = self.tokenizer.encode(job.prompt)
        negative = self.tokenizer.encode(job.negative_prompt) if use_cfg else None
        t1 = time.perf_counter()
        with self.text_encoder.loaded():
            cond = self.encode(prompt.ids)
            uncond = self.encode(negative.ids) if negative else None
        timings["tokenize"], timings["encode"] = t1 - t0, time.perf_counter() - t1
        dropped, neg_dropped = prompt.dropped, negative.dropped if negative else 0
        if dropped or neg_dropped:
            log.warning("prompt too long: %d prompt and %d negative prompt tokens dropped (limit %d)",
                        dropped, neg_dropped, self.tokenizer.max_length)
        shape = (1, self.latent_channels, height // self.bundle.vae_scale, width // self.bundle.vae_scale)
        pixels = edit.to_encode()
        if pixels:
            t_encode = time.perf_counter()
            with self.vae_encoder.loaded():
                edit.moments = {name: self.encode_image(p) for name, p in pixels.items()}
            timings["vae_encode"] = time.perf_counter() - t_encode

        def reporter(k: int) -> Callable[[int, float, np.ndarray], None]:
            def report(step: int, seconds: float, latents: np.ndarray) -> None:
                timings["steps"].append(seconds)
                if on_step is not None:
                    on_step(Step(k, job.count, step, steps, seconds, latents))
            return report

        finals, notes = [], list(edit.notes)
        with self.unet.loaded():
            for k in range(job.count):
                rng = make_rng(job.seed + k)
                scheduler.set_timesteps(job.steps)
                start = edit.start(scheduler, lambda shape: gaussian(rng, shape), shape, cond, uncond,
                                   self.bundle.encoder_scaling_factor, self.bundle.vae_shift_factor)
                steps = len(scheduler.timesteps) - start.index
                latents, done = self._denoise(start, job, scheduler, rng, reporter(k), cancel, finish)
                finals.append(latents)
                if finish is not None and finish.is_set() and (done < steps or k + 1 < job.count):
                    notes.append(f"interrupted: image {k + 1} of {job.count} ends at step {done} of {steps}"
                                 f" (its denoised estimate there); {job.count - k - 1} more not made")
                    break
        t2 = time.perf_counter()
        with self.vae_decoder.loaded():
            images = [GeneratedImage(job.seed + k, edit.finish(self.decode(latents)))
                      for k, latents in enumerate(finals)]
        timings["decode"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return Result(job=job, images=images, width=width, height=height, scheduler=scheduler.name,
                      sampler=schedulers.sampler_label(scheduler),
                      tokens_dropped={"prompt": dropped, "negative_prompt": neg_dropped}, timings=timings,
                      lora_hashes=self.lora.hashes(job.loras),
                      warnings=[w for w in (prompt_warning(self.tokenizer, job.prompt, self.bundle.name),) if w]
                      + notes, parameters=edit.parameters())


@contextmanager
def record_inputs(pipe: Pipeline) -> Iterator[dict[str, list[dict[str, np.ndarray]]]]:
    """The inputs each component is called with while the block generates (calibration, profiling)."""
    models = {name: getattr(pipe, name) for name in COMPONENTS}
    if pipe.vae_encoder is not None:
        models["vae_encoder"] = pipe.vae_encoder
    for model in models.values():
        model.record = []
    try:
        yield {name: model.record for name, model in models.items()}
    finally:
        for model in models.values():
            model.record = None
