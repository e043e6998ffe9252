"""Adapter overhead at real backbone geometry: the step time of the adapter-steered DiT over the bare DiT's.

A random-weight Wan DiT at the real width and depth (Wan2.1-1.3B: dim 1536, 30 blocks, FFN 8960) is loaded through
ComfyUI's own detection (comfy.sd.load_diffusion_model_state_dict), in float32, and called as ComfyUI's samplers
call it on a small token grid with the real 512-token text context. The bare model, a `direct` adapter and a
`shared_blocks` adapter (both zero-initialised, so their output must equal the bare model's) are timed in turn,
repeat after repeat, and each ratio is a ratio of medians. Weights are random: the cost of a step does not depend
on their values.
"""
import math
from statistics import median

from harness import run_worker, section, table, timed, worker

# Real Wan geometries (the released configs): width, depth, FFN width, latent channels.
GEOMETRIES = {
    "wan2.1-1.3B": dict(dim=1536, num_layers=30, ffn_dim=8960, latent_channels=16),
    "wan2.2-5B": dict(dim=3072, num_layers=30, ffn_dim=14336, latent_channels=48),
    "tiny": dict(dim=256, num_layers=2, ffn_dim=1536, latent_channels=16),  # for the harness's own test
}
MODES = ("direct", "shared_blocks")


def weight_count(dim, num_layers, ffn_dim, latent_channels, text_dim=4096, freq_dim=256, patch=4):
    """Parameters of a Wan T2V DiT (comfy/ldm/wan/model.py), to decide before building it whether it fits."""
    d, f, out = dim, ffn_dim, latent_channels * patch
    # self- and cross-attention (q, k, v, o with biases; q/k RMSNorms), affine norm3, FFN, 6-way modulation
    block = 2 * (4 * d * d + 4 * d + 2 * d) + 2 * d + (2 * d * f + f + d) + 6 * d
    # patch embedding, text and time MLPs, 6-way time projection
    embed = (out * d + d) + (text_dim * d + d + d * d + d) + (freq_dim * d + d + d * d + d) + (6 * d * d + 6 * d)
    head = d * out + out + 2 * d
    return num_layers * block + embed + head


def load_bytes_needed(geometry):
    """Peak host bytes to build and load it in float32: the state dict and the loaded copy exist together."""
    return 2 * 4 * weight_count(**geometry)


@worker("adapter_overhead")
def overhead_worker(config):
    import torch

    import comfy.model_management
    import comfy.sd
    import tiny_models
    from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
    from comfyui_litevsr.nodes.core.adapter import trainable_parameters
    from comfyui_litevsr.nodes.core.memory import host_available_bytes
    from comfyui_litevsr.nodes.model_nodes import new_adapter

    geometry = GEOMETRIES[config["geometry"]]
    need, have = load_bytes_needed(geometry), host_available_bytes()
    if need > 0.9 * have:
        return {"skipped": f"needs about {need / 2 ** 30:.0f} GiB of host memory to build and load in float32 "
                           f"(state dict + loaded copy), {have / 2 ** 30:.1f} GiB available here"}
    state = tiny_models.tiny_wan_dit_state_dict(**geometry)
    model = comfy.sd.load_diffusion_model_state_dict(state)
    del state
    dit = model.model.diffusion_model
    dtype = next(dit.parameters()).dtype
    signature = backbone_signature(model)
    context = tiny_models.zero_text_context()
    backbone_params = sum(p.numel() for p in dit.parameters())

    adapters = {mode: new_adapter(signature, mode, 0) for mode in MODES}
    params = {mode: trainable_parameters(adapter) for mode, adapter in adapters.items()}
    steered = {mode: make_denoiser(attach_adapter(model, adapter, context)) for mode, adapter in adapters.items()}
    comfy.model_management.load_models_gpu([model])
    device = model.load_device

    frames, height, width = config["latent"]
    generator = torch.Generator().manual_seed(0)
    x, lr, estimate = (torch.randn(1, signature.latent_channels, frames, height, width, generator=generator)
                       for _ in range(3))
    sigma = torch.tensor([0.5])

    def bare():
        return model.model.apply_model(x.to(device), sigma.to(device), c_crossattn=context.to(device),
                                       transformer_options={})

    calls = {"bare": bare, **{mode: (lambda f=f: f(x, sigma, lr, estimate)) for mode, f in steered.items()}}

    times = {name: [] for name in calls}
    with torch.inference_mode():
        outputs = {name: timed(call, device)[0] for name, call in calls.items()}  # warm-up: kernels, lazy init
        for _ in range(config["repeats"]):
            for name, call in calls.items():  # interleaved, so drift in machine speed hits all alike
                times[name].append(timed(call, device)[1])
    # A zero-initialised adapter must leave the backbone's output unchanged: proof the timed path is the real one.
    identity = {mode: float((outputs[mode] - outputs["bare"]).abs().max()) for mode in MODES}
    medians = {name: median(values) for name, values in times.items()}
    tokens = frames * math.ceil(height / 2) * math.ceil(width / 2)
    return {"geometry": config["geometry"], **geometry, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "latent": [signature.latent_channels, frames, height, width], "tokens": tokens,
            "text_tokens": context.shape[1], "repeats": config["repeats"], "backbone_params": backbone_params,
            "adapter_params": params, "step_seconds": times, "median_step_seconds": medians,
            "max_abs_diff_zero_init_vs_bare": identity}


@section("adapter_overhead")
def overhead_section(args):
    """Step time of each injection mode over the bare backbone's, and the adapter's share of the parameters."""
    runs, skipped = {}, {}
    ok = True
    for name in args.overhead_geometries.split(","):
        print(f"\n[bench adapter_overhead] {name}: {GEOMETRIES[name]}, latent {args.overhead_latent}, "
              f"{args.repeats} repeats", flush=True)
        config = {"geometry": name, "latent": [int(v) for v in args.overhead_latent.split("x")],
                  "repeats": args.repeats}
        run = run_worker("adapter_overhead", config, args.scratch / f"overhead_{name}.log", timeout=args.timeout)
        if "skipped" in run:
            skipped[name] = run["skipped"]
            print(f"[bench adapter_overhead] {name}: SKIPPED, {skipped[name]}", flush=True)
            continue
        medians = run["median_step_seconds"]
        run["ratio"] = {mode: round(medians[mode] / medians["bare"], 3) for mode in MODES}
        run["params_share"] = {mode: round(run["adapter_params"][mode] / run["backbone_params"], 4) for mode in MODES}
        ok &= all(diff == 0 for diff in run["max_abs_diff_zero_init_vs_bare"].values())
        runs[name] = run
    print("\n" + table(["geometry", "tokens", "bare s", "direct s", "shared s", "direct x", "shared x",
                        "adapter params (direct)"],
                       [[name, r["tokens"], f"{r['median_step_seconds']['bare']:.2f}",
                         f"{r['median_step_seconds']['direct']:.2f}",
                         f"{r['median_step_seconds']['shared_blocks']:.2f}", r["ratio"]["direct"],
                         r["ratio"]["shared_blocks"],
                         f"{r['adapter_params']['direct'] / 1e6:.1f} M ({100 * r['params_share']['direct']:.2f} %)"]
                        for name, r in runs.items()]), flush=True)
    result = {"what": "median DiT step time with a zero-init adapter / bare backbone step, random fp32 weights at "
                      "real geometry, loaded through ComfyUI's detection", "runs": runs, "skipped": skipped}
    headline = {}
    if runs:
        main = runs.get("wan2.1-1.3B") or next(iter(runs.values()))
        headline = {"adapter_overhead": {**main["ratio"], "geometry": main["geometry"]},
                    "adapter_params_share": {**main["params_share"], "geometry": main["geometry"]}}
    return result, ok and bool(runs), headline
