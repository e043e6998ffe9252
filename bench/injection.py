"""Which injection mode new adapters default to: what `direct` and `shared_blocks` cost at the real Wan geometries.

Analytic, from the planner's own formulas (nothing re-derived here): trainable parameters from the adapter module
itself, built on the meta device from each registry release's signature (`core/adapter.py`, full rank and rank
LOW_RANK), over the backbone's (`backbones.dit_parameters`, exact); the matrix-product FLOPs of one sampling step
(`memory.dit_step_flops`, exact against torch's FLOP counter, tests/test_bench.py) and its activation peak
(`memory.dit_step_bytes`, calibrated against measured forwards) at the sampler's largest automatic chunk: 81 frames
at the release's training resolution, the planner's default DiT tile; and one training step at the Video Dataset
node's default clip (17 frames, 256x256 px, batch 1, bfloat16, gradient checkpointing on as the Train node
defaults), counted as `distill.step_estimate` counts one: a forward, its recompute and a backward of two forwards,
and the block inputs kept for backward (twice the rows in shared_blocks: the condition half is kept too).

Measured (`injection_modes` section): on a tiny stand-in DiT in float32 on this machine, the forward and the
training step (forward + backward into the adapter, gradient checkpointing on) of each mode, timed interleaved until
the fastest repeats agree, against the same formula's prediction for that stand-in: a sanity check that the
analytic ratios are what the modules cost, not a real-size timing (adapter_overhead is that).
"""
import math

from bench.harness import (RepeatPolicy, publish, repeat_policy, repeat_until_settled, run_worker, section,
                           summarize_records, table, timed, verdict, worker)
from tools import comfy_env

comfy_env.import_pack()
from comfyui_litevsr.nodes.core import backbones  # noqa: E402
from comfyui_litevsr.nodes.core.memory import dit_step_bytes, dit_step_flops, dit_tokens  # noqa: E402

MODES = ("direct", "shared_blocks")
RELEASES = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b")
LOW_RANK = 64
INFERENCE_FRAMES = 81  # memory_plan.MAX_AUTO_CHUNK_FRAMES: the longest chunk the planner picks by itself
TRAINING_CLIP = (17, 256, 256)  # frames, height, width px: the Video Dataset node's defaults
ACTIVATION_BYTES = 2  # bfloat16, what a GPU run computes in
BACKWARD_FORWARDS = 3  # distill.step_estimate's count with gradient checkpointing: recompute + backward of two
# The tiny stand-in the timing uses: overhead.GEOMETRIES["tiny"] (width 256, 2 blocks, FFN 1536), 512 tokens.
STAND_IN = dict(family="wan2.1", dim=256, num_layers=2, ffn_dim=1536)
STAND_IN_LATENT = (2, 32, 32)


def latent_of(signature, frames, height_px, width_px):
    """(latent frames, h, w) of a clip of `frames` at height x width px."""
    return (frames - 1) // 4 + 1, height_px // signature.vae_stride, width_px // signature.vae_stride


def adapter_parameters(signature, mode, rank):
    """Trainable parameters of a new adapter of that shape, counted on the module (meta device: nothing allocated)."""
    import torch

    from comfyui_litevsr.nodes.core.adapter import AdapterConfig, StateAwareAdapter, trainable_parameters

    with torch.device("meta"):
        return trainable_parameters(StateAwareAdapter(AdapterConfig(signature, mode=mode, rank=rank)))


def training_step_flops(signature, latent, mode, ffn_dim, rank=0):
    """Matrix-product FLOPs of one training step: forward + BACKWARD_FORWARDS forwards (distill.step_estimate's
    count with gradient checkpointing)."""
    return (1 + BACKWARD_FORWARDS) * dit_step_flops(signature, *latent, adapter_mode=mode, ffn_dim=ffn_dim,
                                                    adapter_rank=rank)


def training_activation_bytes(signature, latent, mode, ffn_dim):
    """Activation bytes of one training step with gradient checkpointing (distill.step_estimate's model): one
    block's forward peak + every block's input kept for backward; shared_blocks keeps x and the condition half."""
    shared = mode == "shared_blocks"
    peak = dit_step_bytes(signature, *latent, ACTIVATION_BYTES, shared_blocks=shared, ffn_dim=ffn_dim)
    rows = dit_tokens(signature, *latent) * (2 if shared else 1)
    return peak + signature.num_layers * rows * signature.dim * ACTIVATION_BYTES


def mode_costs(release_id):
    """Everything the default rests on, for one release: per mode the adapter's parameters (full rank and
    LOW_RANK) and their share of the backbone's, one sampling step's FLOPs and activation peak at INFERENCE_FRAMES
    of its training resolution, one training step's FLOPs and activations at TRAINING_CLIP; each also over the
    bare backbone (FLOPs) and over direct (everything)."""
    release = backbones.release(release_id)
    sig, ffn = release.signature, release.ffn_dim
    width_px, height_px = release.training_px
    sample = latent_of(sig, INFERENCE_FRAMES, height_px, width_px)
    train = latent_of(sig, *TRAINING_CLIP)
    bare = dit_step_flops(sig, *sample, ffn_dim=ffn)
    backbone = release.parameters
    modes = {}
    for mode in MODES:
        params = {rank: adapter_parameters(sig, mode, rank) for rank in (0, LOW_RANK)}
        modes[mode] = {
            "params": params[0], "params_share": params[0] / backbone,
            "params_low_rank": params[LOW_RANK], "params_low_rank_share": params[LOW_RANK] / backbone,
            "step_flops": dit_step_flops(sig, *sample, adapter_mode=mode, ffn_dim=ffn),
            "step_bytes": dit_step_bytes(sig, *sample, ACTIVATION_BYTES, shared_blocks=mode == "shared_blocks",
                                         ffn_dim=ffn),
            "train_flops": training_step_flops(sig, train, mode, ffn),
            "train_bytes": training_activation_bytes(sig, train, mode, ffn)}
        modes[mode]["step_vs_bare"] = modes[mode]["step_flops"] / bare
    for key in ("params", "step_flops", "step_bytes", "train_flops", "train_bytes"):
        modes["shared_blocks"][f"{key}_vs_direct"] = modes["shared_blocks"][key] / modes["direct"][key]
    return {"release": release_id, "backbone_params": backbone, "sample_clip": [INFERENCE_FRAMES, width_px, height_px],
            "train_clip": list(TRAINING_CLIP), "sample_latent": list(sample),
            "sample_tokens": dit_tokens(sig, *sample), "train_latent": list(train),
            "train_tokens": dit_tokens(sig, *train), "bare_step_flops": bare, "modes": modes}


def cost_rows(costs):
    """One row per release and mode of `mode_costs` results, for `harness.table`."""
    rows = []
    for c in costs:
        for mode in MODES:
            m = c["modes"][mode]
            rows.append([c["release"], mode, f"{m['params'] / 1e6:.0f} M ({100 * m['params_share']:.2f} %)",
                         f"{m['params_low_rank'] / 1e6:.1f} M ({100 * m['params_low_rank_share']:.2f} %)",
                         f"{m['step_flops'] / 1e12:.0f} ({m['step_vs_bare']:.2f}x)",
                         f"{m['step_bytes'] / 2 ** 30:.1f}", f"{m['train_flops'] / 1e12:.1f}",
                         f"{m['train_bytes'] / 2 ** 30:.2f}"])
    return rows


COST_HEADERS = ["release", "mode", "params (of DiT)", f"rank {LOW_RANK}", "step TFLOP (/ bare)",
                "step act GiB", "train TFLOP", "train act GiB"]


@worker("injection_modes")
def timing_worker(config):
    """Forward and training step of each mode on the tiny stand-in, timed interleaved."""
    import torch

    import comfy.sd
    from tools import tiny_models
    from comfyui_litevsr.nodes.adapters import new_adapter
    from comfyui_litevsr.nodes.backbone import attach_adapter, backbone_signature, make_denoiser
    from comfyui_litevsr.nodes.training_mode import comfy_training_mode

    policy = RepeatPolicy(**config["policy"])
    geometry, latent = config["geometry"], config["latent"]
    model = comfy.sd.load_diffusion_model_state_dict(tiny_models.tiny_wan_dit_state_dict(**geometry))
    model.model.requires_grad_(False)
    signature = backbone_signature(model)
    context = tiny_models.zero_text_context()
    generator = torch.Generator().manual_seed(0)
    x, lr, estimate = (torch.randn(1, signature.latent_channels, *latent, generator=generator) for _ in range(3))
    sigma = torch.tensor([0.5])
    calls = {}
    with torch.inference_mode(False), torch.enable_grad(), comfy_training_mode():
        for mode in MODES:
            adapter = new_adapter(signature, mode, 0)
            patched = attach_adapter(model, adapter, context)
            infer, train = make_denoiser(patched), make_denoiser(patched, gradient_checkpointing=True)
            adapter.requires_grad_(True)

            def forward(denoise=infer):
                with torch.no_grad():
                    return denoise(x, sigma, lr, estimate)

            def step(denoise=train, adapter=adapter):
                adapter.zero_grad(set_to_none=True)
                denoise(x, sigma, lr, estimate).square().mean().backward()

            calls[f"{mode} forward"], calls[f"{mode} train"] = forward, step
        device = torch.device("cpu")
        for call in calls.values():
            call()  # warm-up
        records = repeat_until_settled({name: (lambda call=call: {"seconds": timed(call, device)[1]})
                                        for name, call in calls.items()}, policy, {"seconds": "min"})
    timings = {name: sets["seconds"] for name, sets in
               summarize_records(records, {"seconds": "min"}, policy.spread_limit).items()}
    return {"geometry": geometry, "latent": latent, "tokens": dit_tokens(signature, *latent),
            "policy": policy.to_dict(), "timings": timings}


def predicted_ratios(geometry, latent):
    """shared_blocks over direct for the stand-in, from the same formulas: forward and training step."""
    sig = backbones.family(geometry["family"]).signature(geometry["dim"], geometry["num_layers"],
                                                         max(1, geometry["dim"] // 128))
    ffn = geometry["ffn_dim"]
    forward = [dit_step_flops(sig, *latent, adapter_mode=mode, ffn_dim=ffn) for mode in MODES]
    train = [training_step_flops(sig, latent, mode, ffn) for mode in MODES]
    return {"forward": forward[1] / forward[0], "train": train[1] / train[0]}


@section("injection_modes")
def injection_section(args):
    """The cost of each injection mode at the real Wan geometries (analytic) and the measured shared_blocks /
    direct ratio on a tiny stand-in (forward and training step) against its prediction."""
    costs = [mode_costs(release_id) for release_id in RELEASES]
    print(f"\n[bench injection_modes] per sampling step at {INFERENCE_FRAMES} frames of each release's training "
          f"resolution, per training step at {TRAINING_CLIP[0]} frames of {TRAINING_CLIP[2]}x{TRAINING_CLIP[1]} px "
          f"(bfloat16 activations, gradient checkpointing)\n" + table(COST_HEADERS, cost_rows(costs)), flush=True)
    config = {"geometry": STAND_IN, "latent": list(STAND_IN_LATENT), "policy": repeat_policy(args).to_dict()}
    run = run_worker("injection_modes", config, args.scratch / "injection_modes.log", timeout=args.timeout)
    t = run["timings"]
    measured = {kind: t[f"shared_blocks {kind}"]["value"] / t[f"direct {kind}"]["value"]
                for kind in ("forward", "train")}
    trust = {kind: verdict([t[f"shared_blocks {kind}"], t[f"direct {kind}"]]) for kind in ("forward", "train")}
    run.update(measured_ratio={k: round(v, 3) for k, v in measured.items()},
               predicted_ratio={k: round(v, 3) for k, v in predicted_ratios(STAND_IN, STAND_IN_LATENT).items()})
    print(table(["stand-in", "tokens", "direct fwd s", "shared fwd s", "direct train s", "shared train s",
                 "shared/direct fwd", "train", "FLOPs predict"],
                [[f"dim {STAND_IN['dim']}, {STAND_IN['num_layers']} blocks", run["tokens"],
                  *(f"{t[name]['value']:.3f}" for name in ("direct forward", "shared_blocks forward",
                                                           "direct train", "shared_blocks train")),
                  run["measured_ratio"]["forward"], run["measured_ratio"]["train"],
                  f"{run['predicted_ratio']['forward']} / {run['predicted_ratio']['train']}"]]), flush=True)
    main = costs[0]["modes"]
    headline = {"injection_modes": {
        "release": costs[0]["release"],
        "step_flops_vs_direct": round(main["shared_blocks"]["step_flops_vs_direct"], 3),
        "train_bytes_vs_direct": round(main["shared_blocks"]["train_bytes_vs_direct"], 3),
        "params_share": {mode: round(main[mode]["params_share"], 4) for mode in MODES},
        "stand_in": publish(measured, trust)}}
    result = {"what": "analytic costs of direct and shared_blocks injection at the real Wan geometries (the "
                      "planner's formulas, parameters counted on meta-device modules), and the measured "
                      "shared_blocks / direct time on a tiny float32 stand-in",
              "costs": costs, "stand_in": run, **verdict(t.values())}
    # a sanity check of the formulas: the stand-in must cost more in shared_blocks, as the FLOPs say
    ok = all(measured[kind] > 1 + 0.5 * (run["predicted_ratio"][kind] - 1) for kind in measured
             if trust[kind]["stable"])
    return result, ok, headline
