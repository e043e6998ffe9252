"""Adapter overhead at real backbone geometry: the step time of the adapter-steered DiT over the bare DiT's, and how
close each step runs to the machine.

A random-weight Wan DiT at the real width and depth (Wan2.1-1.3B's, from the backbone registry) is loaded through
ComfyUI's own detection (comfy.sd.load_diffusion_model_state_dict), in float32, and called as ComfyUI's samplers
call it on a small token grid with the real 512-token text context. The bare model, a `direct` adapter and a
`shared_blocks` adapter (both zero-initialised, so their output must equal the bare model's) are timed in turn,
interleaved with two machine probes (a matmul at the DiT's width: the machine's peak; a large copy: its memory
bandwidth), round after round until the fastest repeats agree (harness.RepeatPolicy); each ratio is a ratio of
minima. Weights are random: the cost of a step does not depend on their values.

The FLOPs of each step come from the planner's formula (memory.dit_step_flops, checked against torch's FLOP
counter), so the achieved FLOP/s over the matmul peak says how close a step runs to the machine, and the FLOPs per
byte of weights against the machine's balance (peak FLOP/s / bytes/s) whether it is compute- or bandwidth-bound.
The headline token count is the smallest of HEADLINE_LATENTS that is compute-bound here: there shared_blocks, which
runs every block on twice the tokens, must cost clearly more than the bare step, and a ratio that does not is
refused as a failed check.
"""
from tools import comfy_env
from bench.harness import (RepeatPolicy, machine_probes, measured_probes, probe_rates, publish, repeat_policy,
                     repeat_until_settled, run_worker, section, summarize_records, table, timed, verdict, worker)

comfy_env.import_pack()
from comfyui_litevsr.nodes.core import backbones  # noqa: E402

# Real Wan geometries (the registry's releases) as the stand-in builder takes them: family, width, depth, FFN width.
GEOMETRIES = {
    "wan2.1-1.3B": backbones.release("wan2.1-t2v-1.3b").stand_in_shape,
    "wan2.2-5B": backbones.release("wan2.2-ti2v-5b").stand_in_shape,
    "tiny": dict(family="wan2.1", dim=256, num_layers=2, ffn_dim=1536),  # for the harness's own test
}
MODES = ("direct", "shared_blocks")
SECONDS = {"seconds": "min"}  # what the steps and probes record, and its statistic (harness: why the minimum)

# Latents (frames x height x width) the headline may use, smallest first: 128, 512, 1024, 2048 and 8192 tokens.
HEADLINE_LATENTS = ((2, 16, 16), (2, 32, 32), (4, 32, 32), (8, 32, 32), (8, 64, 64))
# Compute-bound: at least twice the machine's balance in FLOPs per byte of weights, so that streaming the weights
# takes at most half the time the products do and the step time follows the FLOPs.
COMPUTE_BOUND_MARGIN = 2.0
# A compute-bound mode must show at least half of its extra FLOPs as extra time (shared_blocks at Wan2.1-1.3B,
# 128 tokens: FLOPs predict 2.04x, so about 1.5x or less is refused; a busy machine once reported 1.02x).
PHYSICS_FLOOR = 0.5


def weight_count(family, dim, num_layers, ffn_dim):
    """Parameters of the stand-in DiT of a geometry (the registry's formula), to decide before building it whether
    it fits."""
    return backbones.dit_parameters(backbones.family(family).signature(dim, num_layers, dim // 128), ffn_dim)


def load_bytes_needed(geometry):
    """Peak host bytes to build and load it in float32: the state dict and the loaded copy exist together."""
    return 2 * 4 * weight_count(**geometry)


def regime(flops, weight_bytes, balance):
    """"compute-bound", "near the ridge" or "bandwidth-bound": a step's FLOPs per byte of weights (each read once
    per step: the least a step moves) against the machine's balance (matmul peak FLOP/s / memory bytes/s)."""
    intensity = flops / weight_bytes
    if intensity >= COMPUTE_BOUND_MARGIN * balance:
        return "compute-bound"
    return "bandwidth-bound" if intensity <= balance else "near the ridge"


def headline_latent(flops_of, weight_bytes, balance, candidates=HEADLINE_LATENTS):
    """The smallest candidate latent whose bare step is compute-bound on this machine (the largest if none is)."""
    for latent in candidates:
        if regime(flops_of(latent), weight_bytes, balance) == "compute-bound":
            return latent
    return candidates[-1]


def plausible(ratio, expected, step_regime, spread=1.0):
    """Whether a ratio shows at least PHYSICS_FLOOR of its mode's extra FLOPs as extra time, allowing for the
    `spread` of its inputs (so that direct injection's few percent are not judged inside the noise); None where the
    step is not compute-bound (there time need not follow FLOPs)."""
    if step_regime != "compute-bound":
        return None
    return ratio * spread >= 1 + PHYSICS_FLOOR * (expected - 1)


def measured(records, work, limit):
    """The timing fields of a worker result from `repeat_until_settled`'s records of the steps and the probes: each
    step's summary (fastest repeat, spread, verdict) and each probe's, with the probe's work per run."""
    steps = {name: rows for name, rows in records.items() if name not in work}
    return {"timings": {name: sets["seconds"] for name, sets in summarize_records(steps, SECONDS, limit).items()},
            "probes": measured_probes({name: records[name] for name in work}, work, limit)}


@worker("adapter_overhead")
def overhead_worker(config):
    import torch

    import comfy.model_management
    import comfy.sd
    from tools import tiny_models
    from comfyui_litevsr.nodes.adapters import new_adapter
    from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
    from comfyui_litevsr.nodes.core.adapter import trainable_parameters
    from comfyui_litevsr.nodes.core.host_memory import host_available_bytes
    from comfyui_litevsr.nodes.core.memory import dit_step_flops, dit_tokens

    geometry = GEOMETRIES[config["geometry"]]
    need, have = load_bytes_needed(geometry), host_available_bytes()
    if need > 0.9 * have:
        return {"skipped": f"needs about {need / 2 ** 30:.0f} GiB of host memory to build and load in float32 "
                           f"(state dict + loaded copy), {have / 2 ** 30:.1f} GiB available here"}
    policy = RepeatPolicy(**config["policy"])
    state = tiny_models.tiny_wan_dit_state_dict(**geometry)
    model = comfy.sd.load_diffusion_model_state_dict(state)
    del state
    dit = model.model.diffusion_model
    dtype = next(dit.parameters()).dtype
    signature = backbone_signature(model)
    context = tiny_models.zero_text_context()
    backbone_params = sum(p.numel() for p in dit.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())

    adapters = {mode: new_adapter(signature, mode, 0) for mode in MODES}
    params = {mode: trainable_parameters(adapter) for mode, adapter in adapters.items()}
    steered = {mode: make_denoiser(attach_adapter(model, adapter, context)) for mode, adapter in adapters.items()}
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    compute_dtype = getattr(model.model, "manual_cast_dtype", None) or dtype  # what the products run in
    probes, work = machine_probes(signature.dim, compute_dtype, device)

    def flops_of(latent, mode=None):
        return dit_step_flops(signature, *latent, adapter_mode=mode, ffn_dim=geometry["ffn_dim"])

    latent = config["latent"]
    if latent is None:  # the smallest token count that is compute-bound here, from a first round of the probes
        rates = probe_rates(measured_probes(repeat_until_settled(probes, policy, SECONDS), work, policy.spread_limit))
        latent = headline_latent(flops_of, weight_bytes, rates["matmul_flops_per_second"] / rates["bytes_per_second"])
    frames, height, width = latent
    generator = torch.Generator().manual_seed(0)
    x, lr, estimate = (torch.randn(1, signature.latent_channels, frames, height, width, generator=generator)
                       for _ in range(3))
    sigma = torch.tensor([0.5])

    def bare():
        return model.model.apply_model(x.to(device), sigma.to(device), c_crossattn=context.to(device),
                                       transformer_options={})

    calls = {"bare": bare, **{mode: (lambda f=f: f(x, sigma, lr, estimate)) for mode, f in steered.items()}}
    steps = {name: (lambda call=call: {"seconds": timed(call, device)[1]}) for name, call in calls.items()}
    with torch.inference_mode():
        outputs = {name: timed(call, device)[0] for name, call in calls.items()}  # warm-up: kernels, lazy init
        # the probes in the same rounds as the steps: a slower moment of the machine hits the peak too
        records = repeat_until_settled({**steps, **probes}, policy, SECONDS)
    # A zero-initialised adapter must leave the backbone's output unchanged: proof the timed path is the real one.
    identity = {mode: float((outputs[mode] - outputs["bare"]).abs().max()) for mode in MODES}
    return {"geometry": config["geometry"], **geometry, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "latent": [signature.latent_channels, frames, height, width],
            "latent_chosen": "auto" if config["latent"] is None else "given",
            "tokens": dit_tokens(signature, frames, height, width), "text_tokens": context.shape[1],
            "policy": policy.to_dict(), "backbone_params": backbone_params, "weight_bytes": weight_bytes,
            "adapter_params": params, **measured(records, work, policy.spread_limit),
            "flops_per_step": {name: flops_of(latent, None if name == "bare" else name) for name in calls},
            "max_abs_diff_zero_init_vs_bare": identity}


def judge(run):
    """What one geometry's measurements say (pure, no measuring): the ratios of minima, the FLOPs each mode should
    cost over the bare step, the achieved FLOP/s over the matmul peak, the regime, the physics check and the
    verdicts. Adds them to `run` and returns it."""
    timings, probes, flops = run["timings"], run["probes"], run["flops_per_step"]
    rates = probe_rates(probes)
    peak = rates["matmul_flops_per_second"]
    balance = peak / rates["bytes_per_second"]
    run.update(matmul_peak_flops_per_second=round(peak), bytes_per_second=round(rates["bytes_per_second"]),
               machine_balance=round(balance, 2), intensity=round(flops["bare"] / run["weight_bytes"], 2),
               regime=regime(flops["bare"], run["weight_bytes"], balance))
    ratio = {mode: timings[mode]["value"] / timings["bare"]["value"] for mode in MODES}
    run["ratio"] = {mode: round(value, 3) for mode, value in ratio.items()}
    run["expected_ratio"] = {mode: round(flops[mode] / flops["bare"], 3) for mode in MODES}
    run["flops_share"] = {name: round(flops[name] / timings[name]["value"] / peak, 3) for name in timings}
    run["ratio_verdict"] = {mode: verdict([timings[mode], timings["bare"]]) for mode in MODES}
    run["flops_share_verdict"] = {name: verdict([timings[name], probes["matmul"]]) for name in timings}
    run["plausible"] = {mode: plausible(ratio[mode], run["expected_ratio"][mode], run["regime"],
                                        run["ratio_verdict"][mode]["spread"])
                        if run["ratio_verdict"][mode]["stable"] else None for mode in MODES}
    run.update(verdict([*timings.values(), *probes.values()]))
    return run


@section("adapter_overhead")
def overhead_section(args):
    """Step time of each injection mode over the bare backbone's, how close each step runs to the matmul peak, and
    the adapter's share of the parameters."""
    runs, skipped = {}, {}
    ok = True
    latent = None if args.overhead_latent == "auto" else [int(v) for v in args.overhead_latent.split("x")]
    for name in args.overhead_geometries.split(","):
        print(f"\n[bench adapter_overhead] {name}: {GEOMETRIES[name]}, latent {args.overhead_latent}, "
              f"{repeat_policy(args).describe()}", flush=True)
        config = {"geometry": name, "latent": latent, "policy": repeat_policy(args).to_dict()}
        run = run_worker("adapter_overhead", config, args.scratch / f"overhead_{name}.log", timeout=args.timeout)
        if "skipped" in run:
            skipped[name] = run["skipped"]
            print(f"[bench adapter_overhead] {name}: SKIPPED, {skipped[name]}", flush=True)
            continue
        run = judge(run)
        run["params_share"] = {mode: round(run["adapter_params"][mode] / run["backbone_params"], 4) for mode in MODES}
        ok &= all(diff == 0 for diff in run["max_abs_diff_zero_init_vs_bare"].values())
        ok &= all(check is not False for check in run["plausible"].values())
        runs[name] = run
    print("\n" + table(["geometry", "tokens", "regime", "bare s", "direct s", "shared s", "direct x", "shared x",
                        "FLOPs predict", "of peak", "spread", "verdict"],
                       [[name, r["tokens"], r["regime"], *(f"{r['timings'][n]['value']:.2f}" for n in r["timings"]),
                         r["ratio"]["direct"], r["ratio"]["shared_blocks"],
                         f"{r['expected_ratio']['direct']} / {r['expected_ratio']['shared_blocks']}",
                         " / ".join(f"{100 * v:.0f}%" for v in r["flops_share"].values()), r["spread"],
                         "stable" if r["stable"] else "UNSTABLE"] for name, r in runs.items()]), flush=True)
    for name, r in runs.items():
        for mode, check in r["plausible"].items():
            if check is False:
                print(f"[bench adapter_overhead] {name} {mode}: FAILED, {r['ratio'][mode]}x where the FLOPs predict "
                      f"{r['expected_ratio'][mode]}x in a compute-bound step: the timing is not the step's cost",
                      flush=True)
    result = {"what": "fastest of repeated DiT steps with a zero-init adapter / bare backbone step, random fp32 "
                      "weights at real geometry, loaded through ComfyUI's detection; FLOPs per step from the "
                      "planner's formula, over a matmul peak probed in the same rounds",
              "runs": runs, "skipped": skipped}
    headline = {}
    if runs:
        main = runs.get("wan2.1-1.3B") or next(iter(runs.values()))
        ratio_trust = {mode: {**main["ratio_verdict"][mode], "plausible": main["plausible"][mode]} for mode in MODES}
        headline = {"adapter_overhead": {**publish(main["ratio"], ratio_trust), "geometry": main["geometry"],
                                         "tokens": main["tokens"], "regime": main["regime"],
                                         "flops_per_step": main["flops_per_step"],
                                         "flops_share": publish(main["flops_share"], main["flops_share_verdict"])},
                    "adapter_params_share": {**main["params_share"], "geometry": main["geometry"]}}
        result.update(verdict(runs.values()))
    return result, ok and bool(runs), headline
