"""ComfyUI side of the adapter: reading the Wan geometry from a MODEL, attaching the adapter through ComfyUI's
wrapper/patch mechanisms (no monkey-patching), and calling the patched model directly for sampling/training."""
import torch
import torch.utils.checkpoint

import comfy.ldm.wan.model
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from .core.adapter_file import check_backbone
from .core.backbones import Recognition, families, recognise
from .core.geometry import BackboneSignature

KEY = "litevsr"  # wrapper key, additional-model key and transformer_options key
CHECKPOINT_KEY = "litevsr_gradient_checkpointing"  # transformer_options flag set by the trainer
FRAME_TIMESTEPS_KEY = "litevsr_frame_timesteps"  # transformer_options: per-frame timesteps [B, T] of one call
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL


class UnsupportedBackbone(ValueError):
    pass


def backbone_signature(model) -> BackboneSignature:
    """Signature of a MODEL from the stock loaders, recognised as a family of the backbone registry by ComfyUI's
    model and latent format classes and the DiT's model type; anything else is refused by name."""
    base = getattr(model, "model", None)
    dit = getattr(base, "diffusion_model", None)
    found = f"{type(base).__name__} ({type(dit).__name__})"
    latent_format = getattr(base, "latent_format", None)
    family = None
    if type(dit) is comfy.ldm.wan.model.WanModel:
        family = recognise(Recognition(type(base).__name__, type(latent_format).__name__, dit.model_type))
    channels = getattr(latent_format, "latent_channels", None)
    if family is None or {channels, dit.in_dim, dit.out_dim} != {family.latent_channels} \
            or tuple(dit.patch_size) != family.patch:
        details = ""
        if isinstance(dit, comfy.ldm.wan.model.WanModel):
            details = f", model_type {dit.model_type}, in_dim {dit.in_dim}, out_dim {dit.out_dim}"
        raise UnsupportedBackbone(
            f"LiteVSR needs a {' or '.join(f.title for f in families())} model from 'Load Diffusion Model'; got "
            f"{found}{details}. I2V, VACE, camera and other variants are not supported.")
    return family.signature(dim=dit.dim, num_layers=dit.num_layers, num_heads=dit.num_heads, text_dim=dit.text_dim)


def _twice(tensor):
    return torch.cat([tensor, tensor]) if torch.is_tensor(tensor) else tensor


class AdapterWrapper:
    """DIFFUSION_MODEL wrapper: once per model call, computes the adapter features from the LR latent, the clean
    estimate, the timestep and the adapter's memory of earlier chunks (when carried), and leaves them for the block
    patches in this call's transformer_options. Where the call carries per-frame timesteps (known frames at their
    context level), the DiT gets those instead of the call's one: Wan's time embedding takes [B, T] (`repeat_e`
    spreads each frame's over its tokens), as ComfyUI's WAN22.process_timestep gives it for TI2V."""

    def __init__(self, adapter_patcher, context, signature):
        self.adapter_patcher = adapter_patcher
        self.context = context
        self.signature = signature

    def __deepcopy__(self, memo):
        return self  # 0.3.75's clone() deep-copies model_options: share, don't duplicate the adapter

    def __call__(self, executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
        lr_latent = kwargs.pop("vsr_lr", None)
        estimate = kwargs.pop("vsr_est", None)
        if lr_latent is None:
            raise ValueError("A MODEL with a LiteVSR adapter must be sampled by 'LiteVSR Sampler' (it supplies the "
                             "LR latent); stock samplers do not.")
        memory = kwargs.pop("vsr_memory", None)
        adapter = self.adapter_patcher.model
        # The adapter reads the call's (the unknown frames') noise level; Wan2.2 may pass per-token timesteps.
        per_sample_t = timestep.reshape(x.shape[0], -1).amax(dim=1)
        features = adapter.features(lr_latent, lr_latent if estimate is None else estimate, per_sample_t, memory=memory)
        transformer_options[KEY] = {"adapter": adapter, "features": features, "condition": None,
                                    "checkpoint": transformer_options.get(CHECKPOINT_KEY, False)}
        frame_timesteps = transformer_options.get(FRAME_TIMESTEPS_KEY)
        if frame_timesteps is not None:
            if frame_timesteps.shape != (x.shape[0], x.shape[2]):
                raise ValueError(f"per-frame timesteps {tuple(frame_timesteps.shape)} do not match the latent's "
                                 f"batch and frames ({x.shape[0]}, {x.shape[2]})")
            timestep = frame_timesteps.to(timestep)
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


def checkpointed(block):
    """A block call recomputed in backward instead of keeping its activations (training of the frozen blocks)."""
    return lambda block_args: torch.utils.checkpoint.checkpoint(block, block_args, use_reentrant=False)


def per_sample_sigmas(sigma, batch, device):
    """sigma (a number or one value per sample) as the [batch] float32 tensor a direct apply_model call takes."""
    return torch.as_tensor(sigma, dtype=torch.float32).to(device).reshape(-1).expand(batch)


class BlockPatch:
    """Replaces Wan block i: runs the frozen block, then adds the adapter's zero-initialised injection."""

    def __init__(self, index):
        self.index = index

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra):
        state = args["transformer_options"][KEY]
        adapter = state["adapter"]
        block = extra["original_block"]
        if state["checkpoint"]:  # training: recompute the frozen block in backward instead of keeping activations
            block = checkpointed(block)
        if adapter.config.mode == "direct":
            out = block(args)
            return {"img": out["img"] + adapter.inject(self.index, state["features"]).to(out["img"].dtype)}
        # shared_blocks: the condition tokens pass the same frozen block as a second batch half.
        x = args["img"]
        condition = state["condition"]
        if condition is None:
            condition = adapter.condition_tokens(x, state["features"])
        both = block({**args, "img": torch.cat([x, condition.to(x.dtype)]),
                                        "txt": _twice(args["txt"]), "vec": _twice(args["vec"])})["img"]
        x, condition = both.split(x.shape[0])
        state["condition"] = condition
        return {"img": x + adapter.inject(self.index, condition).to(x.dtype)}


def find_attachment(model):
    wrappers = model.get_wrappers(DIFFUSION_MODEL, KEY) if hasattr(model, "get_wrappers") else []
    return wrappers[0] if wrappers else None


def attach_adapter(model, adapter, context):
    """A clone of `model` with the adapter attached; the adapter rides along as an additional model, so ComfyUI
    loads, offloads and frees it together with the DiT."""
    signature = backbone_signature(model)
    check_backbone(adapter.config, signature)
    if find_attachment(model) is not None:
        raise ValueError("This MODEL already has a LiteVSR adapter attached; attach only one.")
    patched = model.clone()
    adapter.requires_grad_(False)
    adapter_patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=model.load_device,
                                                       offload_device=model.offload_device)
    patched.set_additional_models(KEY, [adapter_patcher])
    patched.add_wrapper_with_key(DIFFUSION_MODEL, KEY, AdapterWrapper(adapter_patcher, context, signature))
    for index in range(signature.num_layers):
        patched.set_model_patch_replace(BlockPatch(index), "dit", "double_block", index)
    return patched


def direct_call_options(model):
    """Loads `model` (and the models riding along) onto the compute device and returns the transformer_options of a
    direct `apply_model` call: the patcher's options with its wrappers merged in, as ComfyUI's samplers do
    (comfy/samplers.py)."""
    comfy.model_management.load_models_gpu([model] + model.get_nested_additional_models())
    options = comfy.patcher_extension.copy_nested_dicts(model.model_options.get("transformer_options", {}))
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    return options


def make_denoiser(model, context=None, gradient_checkpointing=False):
    """denoise(x, sigma, lr, estimate, carried=None) -> x0 for a MODEL with an adapter, in the model's latent space;
    sigma is a number or one value per sample; `carried` (core/sampling.py, Carried): per-frame noise levels for
    the DiT and the adapter's memory.

    Loads the DiT and the adapter onto the compute device and merges the patcher's wrappers into the call
    options, as ComfyUI's samplers do (comfy/samplers.py; why the sampler calls the model directly: ARCHITECTURE.md)."""
    attachment = find_attachment(model)
    if attachment is None:
        raise ValueError("This MODEL has no LiteVSR adapter: put 'Attach State-Aware Adapter' between the model "
                         "loader and the sampler.")
    options = direct_call_options(model)
    device = model.load_device
    options[CHECKPOINT_KEY] = gradient_checkpointing
    text = (attachment.context if context is None else context).to(device)

    def denoise(x, sigma, lr_latent, estimate, carried=None):
        batch = x.shape[0]
        sigmas = per_sample_sigmas(sigma, batch, device)
        call_options = dict(options, sigmas=sigmas)
        extra = {}
        if carried is not None and carried.frame_sigmas is not None:
            # Timesteps by ComfyUI's own sigma -> t rule, in float32 as it gives the call's; in the options, not a
            # keyword: apply_model casts keywords to the model dtype (bf16 would tell a frame at 0.625 "624").
            frame_sigmas = carried.frame_sigmas.to(device, torch.float32).reshape(-1, x.shape[2])
            call_options[FRAME_TIMESTEPS_KEY] = model.model.model_sampling.timestep(frame_sigmas).float().expand(
                batch, -1)
        if carried is not None and carried.memory is not None:
            extra["vsr_memory"] = carried.memory.to(device)
        return model.model.apply_model(x.to(device), sigmas, c_crossattn=text.expand(batch, -1, -1),
                                       transformer_options=call_options, vsr_lr=lr_latent.to(device),
                                       vsr_est=estimate.to(device), **extra)

    return denoise
