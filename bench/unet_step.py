"""One sampling step of a Stable Diffusion UNet, timed per base-branch strategy, with no WebUI.

The whole-image benchmark (`webui_bench.py`) measures what a user waits for, inside a WebUI whose
own per-step work is part of every number. This times only the model calls of one guided step on
a random-weight diffusers `UNet2DConditionModel` built from a real config (SD1.5 or SDXL), with a
random rank-R LoRA on every Linear and 1x1 Conv2d of its transformer blocks, merged into the
weights as a host merges it, so the gap between the strategies and the floor is ours alone:

    plain       the LoRA'd model on [cond; uncond]: what a step costs without AutoLoRA
    floor       the LoRA'd model on twice that batch, no hooks: what one fused forward of both
                branches cannot beat
    batched, dual, sequential, swap
                AutoLoRA's four evaluations through `make_strategy(...).evaluate` (the same call
                the hosts make), the strategy entered once as for a generation

Variants run interleaved round after round; each prints its median ms per step over rounds and
the ratios to plain and to floor. `--profile FILE` also appends, per variant, one profiled step's
operator table and its count of operator calls and kernel launches.

    python bench/unet_step.py --unet-config <forge>/backend/huggingface/runwayml/stable-diffusion-v1-5/unet/config.json \
        --size 512 --images 1 --device cuda --dtype fp16

On a CPU, `--width-div 10` divides the channel widths by 10: the layer count and so the per-layer
Python and launch work stay those of the real model while the arithmetic nearly vanishes, a proxy
for a launch-bound GPU step. Its times are CPU times of a narrowed model, never GPU figures.
Needs torch and diffusers (the Forge venv has both; the GPU script's carried wheels do).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib_autolora.base_branch import make_strategy  # noqa: E402
from lib_autolora.factors import LoraFactors, LowRankTerm  # noqa: E402
from demo.kohya import merge_into  # noqa: E402

VARIANTS = ("plain", "floor", "batched", "dual", "sequential", "swap")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def narrowed(config: dict, div: int) -> dict:
    """The config with every channel width divided by `div`; head counts that no longer divide a
    width become 1 (diffusers' SD configs give head counts in attention_head_dim)."""
    if div == 1:
        return config
    config = dict(config)
    widths = [c // div for c in config["block_out_channels"]]
    config["block_out_channels"] = widths
    heads = config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    config["attention_head_dim"] = [h if w % h == 0 else 1 for h, w in zip(heads, widths)]
    return config


def build_unet(config_path: str, width_div: int, device, dtype):
    from diffusers import UNet2DConditionModel
    config = narrowed(json.loads(Path(config_path).read_text()), width_div)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: an SDXL UNet in seconds on a GPU
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(dtype=dtype).eval(), config


def lora_targets(unet) -> dict:
    """name -> module: every Linear and 1x1 Conv2d inside a transformer block (attention q/k/v/out,
    feed-forward, proj_in/out), the coverage of the GPU script's rank-32 LoRAs."""
    out = {}
    for name, module in unet.named_modules():
        if ".attentions." not in f".{name}":
            continue
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)):
            out[name] = module
    return out


def random_lora(targets: dict, rank: int, seed: int = 1) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    factors = LoraFactors()
    for name, module in targets.items():
        weight = module.weight
        n_out, n_in = weight.shape[0], weight.shape[1]
        r = min(rank, n_in, n_out)
        down = torch.randn(r, n_in, generator=g) / n_in ** 0.5
        up = torch.randn(n_out, r, generator=g) * 0.01
        if weight.ndim == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        factors.add(module, name, LowRankTerm(down.to(weight.device), up.to(weight.device), 1.0))
    return factors


def step_inputs(config: dict, size: int, images: int, device, dtype, seed: int = 2):
    """Positional args (batch first) of one branch's model call: [cond; uncond] rows."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * images
    latent = size // 8
    x = torch.randn(rows, config["in_channels"], latent, latent, generator=g)
    t = torch.full((rows,), 500.0)
    context = torch.randn(rows, 77, config["cross_attention_dim"], generator=g)
    args = [x, t, context]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size/crop ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        args += [torch.randn(rows, pooled, generator=g),
                 torch.tensor([[size, size, 0, 0, size, size]] * rows, dtype=torch.float32)]
    return tuple(a.to(device=device, dtype=dtype) for a in args)


def unet_forward(unet):
    def forward(x, t, context, pooled=None, time_ids=None):
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        return unet(x, t, context, added_cond_kwargs=added, return_dict=False)[0]
    return forward


def variant_step(name: str, forward, args, strategy):
    """A zero-argument callable that runs one step's model calls of `name`."""
    if name == "plain":
        return lambda: forward(*args)
    if name == "floor":
        doubled = tuple(torch.cat([a, a]) for a in args)
        return lambda: forward(*doubled)
    return lambda: strategy.evaluate(forward, args, args)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device, steps: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1000.0


def profile_step(step, device, path: Path, title: str) -> dict:
    """One step under torch.profiler: its operator table and counts of operator calls and launches,
    appended to `path` under `title`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.events()
    counts = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::")),
              "kernel_launches": sum(1 for e in events
                                     if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))}
    sort = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    with path.open("a") as f:
        f.write(f"\n## {title}\n{counts}\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")
    return counts


def print_table(median: dict) -> None:
    plain, floor = median.get("plain"), median.get("floor")
    print(f"{'variant':11s} {'ms/step':>8s} {'x plain':>8s} {'x floor':>8s}")
    for name, ms in median.items():
        ratio = lambda ref: f"{ms / ref:7.2f}x" if ref else "       -"
        print(f"{name:11s} {ms:8.2f} {ratio(plain)} {ratio(floor)}", flush=True)


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    unet, config = build_unet(args.unet_config, args.width_div, device, dtype)
    targets = lora_targets(unet)
    factors = random_lora(targets, args.rank)
    merge_into(factors)
    forward = unet_forward(unet)
    inputs = step_inputs(config, args.size, args.images, device, dtype)
    title = (f"UNet {Path(args.unet_config).parent.parent.name}, widths {config['block_out_channels']}, "
             f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params, {len(targets)} LoRA'd layers "
             f"(rank {args.rank}), {args.size} px, {args.images} image(s), {args.dtype} on {device}")
    print(title, flush=True)

    strategies, steps = {}, {}
    with torch.inference_mode():
        for name in args.variants:
            if name not in ("plain", "floor"):
                try:  # entered once, as for a generation (swap and dual build their weights here)
                    strategies[name] = make_strategy(name, factors, 1.0, weights_merged=True).__enter__()
                except Exception as exc:  # e.g. out of memory: the other variants still run
                    print(f"{name}: could not start ({type(exc).__name__}: {exc}); dropped", flush=True)
                    continue
            steps[name] = variant_step(name, forward, inputs, strategies.get(name))
        try:
            for name in list(steps):  # warm-up: kernels chosen, caches built
                try:
                    for _ in range(args.warmup):
                        steps[name]()
                except Exception as exc:  # e.g. out of memory: the other variants still run
                    print(f"{name}: failed in warm-up ({type(exc).__name__}: {exc}); dropped", flush=True)
                    del steps[name]
            times = {name: [] for name in steps}
            order = list(steps)
            rng = random.Random(0)
            for _ in range(args.rounds):
                rng.shuffle(order)
                for name in order:
                    times[name].append(time_steps(steps[name], device, args.steps_per_round))
            median = {name: statistics.median(t) for name, t in times.items()}
            print_table(median)
            profiles = {}
            if args.profile:
                try:  # the timings above stand even if the profiler cannot run here
                    for name, step in steps.items():
                        profiles[name] = profile_step(step, device, Path(args.profile), f"{title}: {name}")
                    print("operator calls / kernel launches per step: "
                          + ", ".join(f"{n} {c['aten_ops']} / {c['kernel_launches']}" for n, c in profiles.items()))
                except Exception as exc:
                    print(f"profile failed: {type(exc).__name__}: {exc}")
        finally:
            for strategy in strategies.values():
                strategy.__exit__(None, None, None)
    return {"config": args.unet_config, "width_div": args.width_div, "size": args.size, "images": args.images,
            "dtype": args.dtype, "device": str(device), "rank": args.rank, "layers": len(targets),
            "ms_per_step": times, "median": median, "profiles": profiles}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-config", required=True, help="a diffusers UNet config.json (SD1.5 or SDXL)")
    parser.add_argument("--width-div", type=int, default=1, help="divide channel widths (CPU proxy of a launch-bound step)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--profile", help="append one profiled step per variant to this file")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
