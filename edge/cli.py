"""The ``edge-imagegen`` command: generate, doctor, quantize, profile, serve (the daemon), submit, history
and ha-remove."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence, TextIO

from . import __version__
from .bundle import COMPONENTS, OPTIONAL_COMPONENTS
from .config import Config, load_config
from .console import ProgressBar
from .errors import EdgeError, ValidationError
from .jobs import RESIZE_MODES, Step, admit, parse_job

# Commands import the model side (onnxruntime, numpy) inside their functions: `submit` and
# `--help` stay fast, since a thin client should not pay for what it never runs.
log = logging.getLogger("edge")

JOB_FLAGS = ("negative_prompt", "steps", "guidance", "seed", "count", "width", "height", "scheduler",
             "strength", "mask_blur", "resize_mode", "image_guidance")
IMAGE_FLAGS = ("init_image", "mask")  # file paths on the command line, base64 in the job


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, see configs/default.yaml)")
    p.add_argument("--model", help="model bundle folder (default: the embedded model)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: physical cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    """The job's fields, shared by generate and submit (both validate through edge.jobs.parse_job)."""
    p.add_argument("prompt")
    p.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, help="-1 or absent: random (the seed used is reported)")
    p.add_argument("--count", type=int, help="number of images; seeds seed, seed+1, ...")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--scheduler", help="euler, euler_a, ddim, lcm, dpmpp_2m, dpmpp_2m_karras")
    p.add_argument("--lora", action="append", metavar="NAME[:STRENGTH]", type=_lora_flag,
                   help="a LoRA from lora.dir, strength 1 if not given (repeatable); <lora:NAME:S> in the prompt works too")
    p.add_argument("--init-image", metavar="PATH", help="start from this image (PNG, JPEG, WebP): image to image")
    p.add_argument("--strength", type=float, help="0-1: how much of the schedule runs (default 0.75; 1 with --mask)")
    p.add_argument("--mask", metavar="PATH", help="inpaint: white = repaint, black = keep (needs --init-image)")
    p.add_argument("--mask-blur", type=int, help="mask blur radius in pixels (default 4)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, help="fit the init image to the size (default just_resize)")
    p.add_argument("--image-guidance", type=float, help="InstructPix2Pix models: image guidance scale (default 1.5)")


def _lora_flag(value: str) -> dict[str, Any]:
    name, _, strength = value.partition(":")
    try:
        return {"name": name, **({"strength": float(strength)} if strength else {})}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: the strength after ':' must be a number") from None


def _job_fields(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Flags given on the command line as job fields; image paths read and base64-encoded."""
    fields = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name in IMAGE_FLAGS:
        path = getattr(args, name)
        if path is not None:
            try:
                fields[name] = base64.b64encode(Path(path).expanduser().read_bytes()).decode("ascii")
            except OSError as exc:
                raise ValidationError(name, f"{path}: cannot read the file ({exc.strerror})") from None
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-imagegen", description="Text-to-image on small ARM64 boards.")
    parser.add_argument("--version", action="version", version=f"edge-imagegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images for one prompt and print their paths")
    _add_job_flags(gen)
    gen.add_argument("--out", help="output folder (config output.dir)")
    gen.add_argument("--id", help="job id used in file names (default: random)")
    _add_common(gen)

    doc = sub.add_parser("doctor", help="show the runtime, CPU, memory, precision tier and model bundle")
    _add_common(doc)

    quant = sub.add_parser("quantize", help="write FP16 and INT8 variants of a bundle's components")
    quant.add_argument("model_dir", type=Path)
    quant.add_argument("--steps", type=int, default=8, help="denoising steps of the calibration runs")
    quant.add_argument("--prompts", type=int, default=6, help="calibration prompts to run (at most 6)")
    quant.add_argument("--max-feeds", type=int, default=48,
                       help="calibration inputs kept per component (more: better ranges, longer calibration)")
    quant.add_argument("--only", action="append", choices=COMPONENTS + OPTIONAL_COMPONENTS, metavar="COMPONENT",
                       help="quantize only this component: text_encoder, unet, vae_decoder or vae_encoder "
                       "(repeatable; e.g. again after it ran out of memory)")
    quant.add_argument("--precision", action="append", choices=("fp16", "int8"),
                       help="write only this variant (repeatable; default both)")
    quant.add_argument("--min-psnr", type=float, default=20.0,
                       help="reject a variant whose images fall below this PSNR (dB) against FP32")
    quant.add_argument("--fidelity-steps", type=int, default=8, help="denoising steps of the fidelity check")
    quant.add_argument("--attention", choices=("mha", "chunk", "off"), default="mha",
                       help="rewrite the FP32 graphs' full-score attention first: in query slices (chunk), as "
                       "onnxruntime's MultiHeadAttention (mha), or not at all (off)")
    quant.add_argument("--attention-chunk", type=int, help="query rows per slice (--attention chunk; default 512)")

    srv = sub.add_parser("serve", help="run the daemon: jobs from MQTT and the local socket (see the README)")
    srv.add_argument("--out", help="output folder (config output.dir; relative: under the state directory)")
    _add_common(srv)

    sbm = sub.add_parser("submit", help="send a job to the running daemon over its socket; prints the image paths")
    _add_job_flags(sbm)
    sbm.add_argument("--priority", type=int, help="higher runs first (default 0)")
    sbm.add_argument("--id", help="job id; resubmitting an id returns that job instead of a new one")
    sbm.add_argument("--socket", type=Path, help="the daemon's socket (default: socket.path, then the usual places)")
    sbm.add_argument("--no-wait", action="store_true", help="print the queued reply and return at once")
    sbm.add_argument("--config", type=Path, help="YAML config (its socket section is used)")
    sbm.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    hist = sub.add_parser("history", help="list past and current jobs of the running daemon, newest first")
    hist.add_argument("--limit", type=int, default=20, help="jobs per page (1-500)")
    hist.add_argument("--before", help="start after this job id (the `next` of the previous page)")
    hist.add_argument("--all", action="store_true", help="follow the pages to the oldest job")
    hist.add_argument("--json", action="store_true", help="print each page as the daemon's JSON")
    hist.add_argument("--socket", type=Path, help="the daemon's socket (default: socket.path, then the usual places)")
    hist.add_argument("--config", type=Path, help="YAML config (its socket section is used)")
    hist.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    har = sub.add_parser("ha-remove", help="remove the device from Home Assistant (empty retained discovery configs)")
    har.add_argument("--config", type=Path, help="YAML config (its mqtt and daemon.device_id are used)")
    har.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    prof = sub.add_parser("profile", help="measure each variant on this machine; writes variants.json")
    prof.add_argument("model_dir", type=Path)
    prof.add_argument("--config", type=Path, help="YAML config (its runtime section is used)")
    prof.add_argument("--calls", type=int, default=3)
    prof.add_argument("--only", action="append", choices=COMPONENTS + OPTIONAL_COMPONENTS, metavar="COMPONENT",
                      help="measure only this component (repeatable; the others' entries are kept)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "model", None):
        overrides["model.path"] = args.model
    if getattr(args, "threads", None) is not None:
        overrides["runtime.threads"] = args.threads
    if getattr(args, "out", None):
        overrides["output.dir"] = args.out
    config = load_config(args.config, overrides)
    if not args.verbose:
        logging.getLogger().setLevel(config.log_level.upper())
    return config


def cmd_generate(args: argparse.Namespace) -> int:
    from .loader import load_pipeline, with_model_defaults
    from .output import save_result
    config = with_model_defaults(config_from_args(args))
    fields = _job_fields(args, JOB_FLAGS)
    job = parse_job({"prompt": args.prompt, "id": args.id, "loras": args.lora, **fields}, config.limits,
                    config.defaults)
    pipeline = load_pipeline(config)
    pipeline.check(job)
    job = admit(job)
    result = pipeline.generate(job, on_step=ProgressBar())
    for name, n in result.tokens_dropped.items():
        if n:
            print(f"warning: {name} is longer than {pipeline.tokenizer.max_length} tokens; "
                  f"{n} tokens were dropped", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = save_result(result, Path(config.output.dir).expanduser().resolve(), job.id, model=pipeline.bundle.name,
                        provider=pipeline.provider, precision=pipeline.precision, sidecar=config.output.sidecar)
    steps = result.timings["steps"]
    print(f"seed {job.seed}, {len(steps)} steps, {result.timings['total']:.2f} s", file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from .bundle import load_bundle
    from .loader import model_defaults
    from .lora_apply import LoraLibrary, describe_loras
    from .memory import MB, choose_plan, read_budget
    from .providers import physical_cores
    from .tokenizer import ClipTokenizer
    from .vocabulary import known_words
    config = config_from_args(args)
    info: dict[str, Any] = {
        "edge-imagegen": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
        "providers_in_build": ort.get_available_providers(),
        "providers_configured": list(config.runtime.providers),
        "physical_cores": physical_cores(),
        "cpu_flags": _cpu_flags(),
    }
    bundle = load_bundle(config.model.path, config.model.decoder)
    budget = read_budget(config.memory.headroom_mb * MB)
    info["memory_budget"] = budget.describe()
    try:
        plan = choose_plan(bundle, budget, config.model.precision, config.lora.cache_sessions)
        info["precision"] = {"tier": plan.tier, "components": plan.precisions, "reason": plan.reason}
        info["lora_cache"] = {"sets": plan.lora.sets, "mb_per_set": plan.lora.set_bytes // MB,
                              "reason": plan.lora.reason}
    except EdgeError as exc:
        info["precision"] = {"error": str(exc)}
    info["model"] = bundle.summary()
    defaults, sources = model_defaults(config, bundle)
    info["defaults"] = {name: {"value": value, "from": sources[name]} for name, value in asdict(defaults).items()}
    library = LoraLibrary.configured(config.lora, bundle)
    info["loras"] = {"dir": str(library.folder), "found": describe_loras(library, bundle)}
    tokenizer = ClipTokenizer.from_dir(bundle.tokenizer_dir)
    words = known_words(tokenizer)
    info["model"]["known_words"] = words if len(tokenizer.vocab) < 5000 else f"a CLIP vocabulary ({len(words)} words)"
    print(json.dumps(info, indent=2))
    return 0


def _cpu_flags() -> list[str]:
    """The SIMD features ONNX Runtime's kernels care about (x86 AVX*, ARM NEON/dotprod/fp16/i8mm)."""
    interesting = {"avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "neon", "asimd",
                   "asimddp", "asimdhp", "fphp", "i8mm", "sve", "bf16"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sorted(interesting & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_bundle
    logging.getLogger().setLevel(logging.WARNING)  # onnxruntime.quantization logs every tensor at INFO
    logging.getLogger("edge").setLevel(logging.INFO)
    manifest = quantize_bundle(args.model_dir, steps=args.steps, min_psnr=args.min_psnr, prompts=args.prompts,
                               fidelity_steps=args.fidelity_steps, max_feeds=args.max_feeds,
                               components=tuple(args.only) if args.only else None,
                               precisions=tuple(args.precision or ("fp16", "int8")),
                               attention=None if args.attention == "off" else args.attention,
                               **({} if args.attention_chunk is None else {"attention_chunk": args.attention_chunk}))
    print(json.dumps(manifest["components"], indent=2))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .profile import profile_bundle
    config = load_config(args.config)
    manifest = profile_bundle(load_bundle(args.model_dir), config.runtime, calls=args.calls,
                              components=tuple(args.only) if args.only else None)
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve
    from .loader import with_model_defaults

    def load() -> Config:  # at start, and again on SIGHUP
        return with_model_defaults(config_from_args(args))

    return serve(load(), load_config=load)


def cmd_submit(args: argparse.Namespace) -> int:
    from .paths import client_socket_path
    config = config_from_args(args)
    # the fields go to the daemon as given: it validates them (one validator for every front end)
    job = _job_fields(args, (*JOB_FLAGS, "priority", "id"))
    if args.lora:
        job["loras"] = args.lora
    return run_submit(args.socket or client_socket_path(config), {"prompt": args.prompt, **job},
                      wait=not args.no_wait)


def run_submit(path: Path, job: dict[str, Any], wait: bool = True, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    """``edge-imagegen submit``: print the image paths (stdout) or the error; progress on stderr."""
    from .client import SocketClient
    bar = ProgressBar(err)
    with SocketClient(path) as client:
        if not wait:
            reply = client.request({"op": "submit", "job": job})
            print(json.dumps(reply), file=out)
            return 0 if reply["status"] != "error" else 2
        for message in client.submit_and_watch(job):
            event = message.get("event")
            if event is None and message["status"] in ("queued", "running"):
                where = f" (position {message['position']})" if message.get("position") else ""
                print(f"job {message['id']} queued{where}, seed {message['seed']}", file=err)
            elif event == "progress":
                bar(Step(message["image"] - 1, message["count"], message["step"], message["steps"],
                         message.get("seconds", 0.0)))
            elif event == "result" or event is None:
                if message["status"] != "ok":
                    print(f"error: {message['error']}", file=err)
                    return 2
                for warning in message.get("warnings", ()):
                    print(f"warning: {warning}", file=err)
                for p in message["paths"]:
                    print(p, file=out)
                return 0
    return 2


def cmd_history(args: argparse.Namespace) -> int:
    from .client import SocketClient
    from .paths import client_socket_path
    config = config_from_args(args)
    before = args.before
    with SocketClient(args.socket or client_socket_path(config)) as client:
        while True:
            page = client.history(args.limit, before)
            if page["status"] != "ok":
                print(f"error: {page['error']}", file=sys.stderr)
                return 2
            if args.json:
                print(json.dumps(page))
            else:
                _print_history(page["jobs"])
            before = page["next"]
            if not args.all or before is None:
                return 0


def _print_history(jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["submitted"]))
        seeds = ",".join(str(s) for s in job["seeds"])
        print(f"{job['id']}  {job['state']}  {when}Z  seed {seeds}  {json.dumps(job['prompt'])}")
        for path in job["paths"]:
            print(f"    {path}")
        if job["error"] and job["state"] != "done":
            print(f"    {job['error']}")


def cmd_ha_remove(args: argparse.Namespace) -> int:
    from .comms.homeassistant import remove_discovery
    from .comms.mqtt_connection import one_off_client
    from .service import default_device_id
    config = config_from_args(args)
    device_id = default_device_id(config)
    client = one_off_client(config, f"{config.mqtt.client_id or 'edge-imagegen-' + device_id}-ha-remove")
    topics = remove_discovery(client, config, device_id)
    print(f"removed {len(topics)} Home Assistant discovery configs of {device_id} from "
          f"{config.mqtt.host}:{config.mqtt.port}", file=sys.stderr)
    if config.mqtt.homeassistant:
        print("note: mqtt.homeassistant is true in this config: the daemon announces the device again at its "
              "next connect", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "doctor": cmd_doctor, "quantize": cmd_quantize, "profile": cmd_profile,
            "serve": cmd_serve, "submit": cmd_submit, "history": cmd_history, "ha-remove": cmd_ha_remove}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
