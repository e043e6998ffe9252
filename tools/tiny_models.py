"""Tiny random-weight stand-ins for Wan checkpoints, built from ComfyUI's own model classes.

Real weights cannot be downloaded here, so tests, `make demo` and `make serve` build small checkpoints whose key
names are exactly those of the real Wan2.1/Wan2.2 files and load them through ComfyUI's stock detection.
Their output is meaningless: they only demonstrate the pipeline.
"""
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from tools import comfy_env

comfy_env.import_pack()
from comfyui_litevsr.nodes.core import backbones  # noqa: E402
from comfyui_litevsr.nodes.core.geometry import INFVSR_CONTEXT_DIM, TEXT_DIM  # noqa: E402

TEXT_LEN = 512


def init_(module, seed, weight_std=None):
    """ComfyUI's ops skip weight init (tensors start as torch.empty), so every tensor is filled here."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if leaf in ("gamma",) or (leaf == "weight" and tensor.ndim == 1):
                tensor.fill_(1.0)
            elif leaf in ("bias", "beta"):
                tensor.zero_()
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else tensor.numel()
                std = weight_std if weight_std is not None else 1.0 / math.sqrt(max(1, fan_in))
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


def tiny_wan_dit_state_dict(dim=256, num_layers=2, family="wan2.1", ffn_dim=None, seed=0, head_std=None,
                            text_dim=TEXT_DIM):
    """State dict of the stand-in DiT of a registry family: a Wan T2V DiT with the family's latent channels, patch
    and model type, which ComfyUI's detection loads as that family's model (Wan2.1 at 16 channels, Wan2.2 at 48).

    `head_std`: std of the output projection. The default 0.02 makes the stand-in's velocity far smaller than a
    trained Wan's (unit scale); training tests use 1/sqrt(dim) so an adapter can steer the output to the target.
    `text_dim`: the context width (umt5's by default; InfVSR's DiT reads 512-wide visual tokens)."""
    import comfy.ldm.wan.model
    import comfy.ops

    if dim % 128:
        raise ValueError("ComfyUI derives heads as dim // 128: dim must be a multiple of 128")
    entry = backbones.family(family)
    model = comfy.ldm.wan.model.WanModel(
        model_type=entry.recognition.model_type, patch_size=entry.patch, in_dim=entry.latent_channels,
        out_dim=entry.latent_channels, dim=dim, ffn_dim=ffn_dim or 2 * dim, freq_dim=backbones.FREQ_DIM,
        text_dim=text_dim, num_heads=dim // 128, num_layers=num_layers, operations=comfy.ops.disable_weight_init)
    init_(model, seed, weight_std=0.02)
    if head_std is not None:
        head = model.head.head.weight
        with torch.no_grad():
            head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed + 1)) * head_std)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# In a trained VAE the residual branches and the mid-block attention are small corrections to the identity path.
# A plain fan-in init makes each as large as the identity, so the random decoder saturates and its single
# attention layer (which sees the whole frame) dominates every pixel. Scaling the last layer of each branch
# gives the stand-in a trained network's character: mostly local, not saturated.
VAE_BRANCH_SCALE = 0.1


def tiny_wan21_vae_state_dict(dim=8, seed=0):
    """State dict of a Wan2.1 VAE with base width `dim` (ComfyUI reads the width from decoder.head.0.gamma)."""
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    init_(vae, seed)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    for name, tensor in state.items():
        if name.endswith((".residual.6.weight", ".proj.weight")):  # last conv of a residual block; attention out
            tensor.mul_(VAE_BRANCH_SCALE)
    return state


def save_tiny_wan_dit(path, **kwargs):
    save_file(tiny_wan_dit_state_dict(**kwargs), str(path))
    return path


def save_tiny_wan21_vae(path, **kwargs):
    save_file(tiny_wan21_vae_state_dict(**kwargs), str(path))
    return path


# The tiny Wan decoders (TAEHV architecture, comfy/taesd/taehv.py) under the names and in the dtypes they are
# published in, with the ComfyUI models/ folder the stock Load VAE reads each from: what ComfyUI makes of a file
# depends on all three (a 16-channel fp16 file is taken for HunyuanVideo's taehv, see nodes/decoders.py).
TINY_DECODERS = {  # file name -> (folder, latent channels, dtype)
    "taew2_1.safetensors": ("vae", 16, torch.float16),
    "lighttaew2_1.safetensors": ("vae_approx", 16, torch.bfloat16),
    "taew2_2.safetensors": ("vae", 48, torch.float16),
    "lighttaew2_2.safetensors": ("vae_approx", 48, torch.bfloat16),
}


def tiny_decoder_state_dict(latent_channels=16, dtype=torch.float16, seed=0):
    """State dict (encoder and decoder, as the published files hold both) of a TAEHV tiny autoencoder for
    `latent_channels`-channel Wan latents: the real architecture and size (11 M parameters), random weights."""
    from comfy.taesd.taehv import TAEHV

    model = TAEHV(latent_channels=latent_channels)
    init_(model, seed)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def save_tiny_decoder(models_dir, name, seed=0):
    """Writes the stand-in for tiny decoder `name` (a TINY_DECODERS key) to `models_dir/<folder>/<name>`."""
    folder, channels, dtype = TINY_DECODERS[name]
    path = Path(models_dir, folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_decoder_state_dict(channels, dtype, seed), str(path))
    return path


STAND_IN_LAYERS = 2  # blocks of the stand-in DiT of save_stand_ins


def save_stand_ins(dit_path, vae_path, dit_dim=256, head_std=None):
    """The stand-ins the tools run on without real models: a 2-block Wan2.1 DiT `dit_dim` wide and a Wan2.1 VAE 8 wide,
    saved (their folders made). Returns both paths."""
    make_parents(dit_path, vae_path)
    return (save_tiny_wan_dit(dit_path, dim=dit_dim, num_layers=STAND_IN_LAYERS, head_std=head_std),
            save_tiny_wan21_vae(vae_path, dim=8))


def steering_adapter(signature, seed=1, std=0.02):
    """A stand-in for a trained adapter (a distillation teacher): a fresh direct adapter whose zero-initialised
    injections are set to small random values, so it steers the DiT."""
    from comfyui_litevsr.nodes.adapters import new_adapter

    adapter = new_adapter(signature, "direct", 0, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.injections.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return adapter


def save_teacher(path, dit_dim=256, seed=1):
    """A `steering_adapter` file for the stand-in DiT of `save_stand_ins` (its geometry), its folder made."""
    from comfyui_litevsr.nodes.core.adapter_file import save_adapter

    signature = backbones.family("wan2.1").signature(dim=dit_dim, num_layers=STAND_IN_LAYERS,
                                                     num_heads=dit_dim // 128, text_dim=TEXT_DIM)
    make_parents(path)
    return save_adapter(str(path), steering_adapter(signature, seed))


def make_parents(*paths):
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def zero_text_context():
    """The all-zero context [1, 512, 4096] (adapters.zero_context's), for attaching an adapter in tests directly."""
    return torch.zeros(1, TEXT_LEN, TEXT_DIM)


# Wan's text encoder, umT5-XXL, at its width (4096: the context width the DiT reads) with 2 blocks of 2 heads of 8,
# a 16-wide feed-forward and a 64-token vocabulary: 1 M parameters instead of 5.7 B. ComfyUI's SDClipModel merges
# model_options["umt5xxl_model_config"] into the config it reads from umt5_config_xxl.json.
TINY_UMT5 = {"num_layers": 2, "num_heads": 2, "d_kv": 8, "d_ff": 16, "vocab_size": 64}
UMT5_CONFIG_OPTION = "umt5xxl_model_config"
# umT5's special ids (pad 0, end 1, unk 2; no start token), which ComfyUI's UMT5XXlTokenizer relies on
TINY_SPIECE_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}
TINY_SPIECE_TEXT = ["a video of a cat walking on a wooden floor", "high quality, sharp details, natural colours",
                    "the quick brown fox jumps over the lazy dog", "slow motion footage of waves at sunset"]


def tiny_spiece_model():
    """A SentencePiece model with umT5's special ids, trained (deterministically) on a few sentences: the bytes
    ComfyUI's umT5 files carry as their `spiece_model` tensor."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_SPIECE_TEXT), model_writer=model, vocab_size=TINY_UMT5["vocab_size"],
        hard_vocab_limit=False, model_type="unigram", normalization_rule_name="identity", num_threads=1,
        minloglevel=2, **TINY_SPIECE_IDS)
    return model.getvalue()


def tiny_umt5_state_dict(seed=0):
    """A umT5-XXL file's state dict at TINY_UMT5's size: the real key names (encoder.block.N..., shared.weight),
    fp16 as umt5_xxl_fp16.safetensors, with the tokenizer as `spiece_model` (uint8)."""
    import json

    import comfy.ops
    import comfy.text_encoders.t5

    with open(Path(comfy.text_encoders.t5.__file__).with_name("umt5_config_xxl.json")) as file:
        config = {**json.load(file), **TINY_UMT5}
    model = comfy.text_encoders.t5.T5(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    init_(model, seed)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    return {**state, "spiece_model": torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)}


def save_tiny_umt5(path, seed=0):
    save_file(tiny_umt5_state_dict(seed), str(path))
    return path


def load_tiny_umt5(path):
    """The stand-in's CLIP, as 'Load CLIP' (type wan) makes umt5_xxl's: ComfyUI's Wan text encoder and tokenizer
    classes (comfy/text_encoders/wan.py), the file's weights and tokenizer. Built here rather than by
    comfy.sd.load_clip, which sizes umT5-XXL from its JSON config and, from 0.33 on, recognises it only by its
    10240-wide feed-forward."""
    from types import SimpleNamespace

    import comfy.sd
    import comfy.text_encoders.wan
    import comfy.utils

    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    tokenizer_data = {"spiece_model": state.pop("spiece_model")}
    target = SimpleNamespace(params={}, clip=comfy.text_encoders.wan.te(),
                             tokenizer=comfy.text_encoders.wan.WanT5Tokenizer)
    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, parameters=comfy.utils.calculate_parameters(state),
                         model_options={UMT5_CONFIG_OPTION: TINY_UMT5})
    missing, unexpected = clip.load_sd(state)
    if missing or unexpected:
        raise ValueError(f"{path} is not a tiny umT5: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return clip


def tiny_ltxv_state_dict(seed=0):
    """A non-Wan video DiT (LTX-Video key names, 1 block, width 128), for testing that non-Wan models are refused."""
    import comfy.ldm.lightricks.model
    import comfy.ops

    model = comfy.ldm.lightricks.model.LTXVModel(in_channels=128, cross_attention_dim=128, attention_head_dim=4,
                                                 num_attention_heads=32, num_layers=1,
                                                 operations=comfy.ops.disable_weight_init)
    init_(model, seed, weight_std=0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_tiny_ltxv(path, **kwargs):
    save_file(tiny_ltxv_state_dict(**kwargs), str(path))
    return path


def tiny_wan_i2v_state_dict(dim=128, num_layers=1, seed=0):
    """A Wan2.1 I2V DiT (36 input channels, CLIP image projection): a Wan the pack must refuse by name."""
    import comfy.ldm.wan.model
    import comfy.ops

    model = comfy.ldm.wan.model.WanModel(
        model_type="i2v", in_dim=36, out_dim=16, dim=dim, ffn_dim=2 * dim, text_dim=TEXT_DIM, num_heads=dim // 128,
        num_layers=num_layers, operations=comfy.ops.disable_weight_init)
    init_(model, seed, weight_std=0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_tiny_wan_i2v(path, **kwargs):
    save_file(tiny_wan_i2v_state_dict(**kwargs), str(path))
    return path


# InfVSR's reference encoder (nodes/core/reference_encoder.py): a tiny Swin in RAM's key layout (embed 16, four
# stages of two blocks, heads 1/2/4/8, window 3, so 96 px images and a 3x3 final map) with a 512-wide image_proj,
# and DAPE LoRA for each of its qkv projections. RAM's file also holds its tagging heads and the Swin's stored
# buffers; a few stand-ins for those prove that loading keeps only the encoder.
TINY_SWIN = dict(in_channels=3, patch=4, embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), windows=(3, 3, 3, 3),
                 mlp_ratio=4, image_size=96)


def tiny_ram_state_dict(seed=0):
    """RAM's checkpoint layout (the "model" entry): `visual_encoder.*` with its stored buffers, `image_proj.*`,
    and tagging-head entries that the reference encoder must ignore."""
    from comfyui_litevsr.nodes.core.reference_encoder import ReferenceEncoder
    from comfyui_litevsr.nodes.core.swin import SwinGeometry

    encoder = ReferenceEncoder(SwinGeometry(**TINY_SWIN), context_dim=INFVSR_CONTEXT_DIM)
    init_(encoder, seed)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    stored_buffers = {name: buffer.clone() for name, buffer in encoder.named_buffers()}
    return {**state, **stored_buffers,
            "label_embed": torch.randn(8, 512, generator=torch.Generator().manual_seed(seed + 1)),
            "tagging_head.embeddings.LayerNorm.weight": torch.ones(768)}


def tiny_dape_state_dict(ram_state, rank=2, seed=1):
    """DAPE's LoRA for each `attn.qkv` of `ram_state`: lora_A [2 * rank, dim], lora_B [2 * dim, rank] (query and
    value pairs; loralib's MergedLinear with enable_lora [True, False, True]). Drawn non-zero, so merging shows."""
    gen = torch.Generator().manual_seed(seed)
    dape = {}
    for key, weight in ram_state.items():
        if key.endswith(".attn.qkv.weight"):
            module, dim = key[:-len(".weight")], weight.shape[1]
            dape[f"{module}.lora_A"] = torch.randn(2 * rank, dim, generator=gen) / dim ** 0.5
            dape[f"{module}.lora_B"] = torch.randn(2 * dim, rank, generator=gen)
    return dape


def save_tiny_reference(folder, seed=0):
    """Writes `ram_swin_large_14m.pth` ({"model": state dict}, as RAM publishes it) and `DAPE.pth` (flat) into
    `folder`; returns both paths."""
    from comfyui_litevsr.nodes.core.reference_encoder import DAPE_FILE, RAM_FILE

    ram = tiny_ram_state_dict(seed)
    ram_path, dape_path = Path(folder, RAM_FILE), Path(folder, DAPE_FILE)
    make_parents(ram_path)
    torch.save({"model": ram}, ram_path)
    torch.save(tiny_dape_state_dict(ram, seed=seed + 1), dape_path)
    return ram_path, dape_path


# --- InfVSR's DiT: a Wan2.1 T2V DiT reading 512-wide visual tokens, released as a pickled bf16 state dict ---------


def save_tiny_infvsr(path, dim=256, num_layers=2, seed=0):
    """A stand-in for InfVSR.ckpt in its own format: the bf16 state dict (original Wan key names, context width
    512) written by torch.save, as the third-party file is."""
    state = tiny_wan_dit_state_dict(dim=dim, num_layers=num_layers, seed=seed, text_dim=INFVSR_CONTEXT_DIM)
    torch.save({key: tensor.to(torch.bfloat16) for key, tensor in state.items()}, str(path))
    return path


def save_infvsr_stand_ins(dit_path, vae_path, reference_folder):
    """The stand-ins for an InfVSR run in InfVSR's own formats: its pickled DiT, and RAM and DAPE in
    `reference_folder`, with the Wan2.1 VAE 8 wide of `save_stand_ins` (folders made). Returns (dit, vae, ram, dape)."""
    make_parents(dit_path, vae_path)
    return (save_tiny_infvsr(dit_path), save_tiny_wan21_vae(vae_path, dim=8), *save_tiny_reference(reference_folder))
