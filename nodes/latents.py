"""The LATENT contract between the pack's nodes: samples plus what the output must be cropped back to."""
INFO_KEY = "litevsr"


def vsr_latent(samples, frames, height, width):
    """`frames`, `height`, `width`: the exact output the decode crops back to (the scale is already in them)."""
    return {"samples": samples, INFO_KEY: {"frames": frames, "height": height, "width": width}}


def vsr_info(latent):
    info = latent.get(INFO_KEY) if isinstance(latent, dict) else None
    if info is None:
        raise ValueError("This LATENT does not come from 'Encode LR Video (LiteVSR)': the pack needs it to know the "
                         "original frame count and size. Encode the LR frames with that node.")
    return info
