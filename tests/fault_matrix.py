"""The fault matrix: every way a user can feed the pack something broken, odd or unlucky, each with its test.

Tests claim a row with `@pytest.mark.matrix(group, row)` (a test may claim several; a row may have several tests).
tests/conftest.py collects their outcomes, prints the table at the end of the session and writes it to
output/test-artifacts/fault_matrix.md; in a full run (every tests/test_*.py collected, nothing deselected) a row
of ROWS that no test claims fails the session, so a row cannot silently lose its test.

NOTES say where a row is tested other than literally, and why.
"""

ROWS = (
    ("Models", "non-Wan MODEL"),
    ("Models", "Wan2.1 DiT with a Wan2.2 VAE"),
    ("Models", "adapter from another backbone"),
    ("Models", "adapter file that is a pickle renamed to .safetensors"),
    ("Models", "truncated safetensors"),
    ("Models", "header with a huge declared size"),
    ("Models", "wrong or missing metadata"),
    ("Models", "adapter from a newer format version"),
    ("Models", "torch.load only with weights_only=True, never reached for a non-safetensors adapter"),
    ("Video", "zero frames"),
    ("Video", "one frame"),
    ("Video", "2 frames"),
    ("Video", "odd sizes (177x97)"),
    ("Video", "sizes that blow the memory budget"),
    ("Video", "variable frame rate"),
    ("Video", "a file that is not a video"),
    ("Video", "no audio"),
    ("Video", "two audio streams"),
    ("Video", "animated webp"),
    ("Video", "path with spaces and non-ASCII characters"),
    ("Runs", "interrupt during sampling"),
    ("Runs", "interrupt during decode"),
    ("Runs", "interrupt during streaming encode"),
    ("Runs", "interrupt during training checkpoint write"),
    ("Runs", "second run queued right after an interrupted one (memory back to baseline)"),
    ("Runs", "two workflows queued concurrently"),
    ("Training", "kill -9 mid-run then resume"),
    ("Training", "dataset folder with unreadable files mixed in"),
    ("Training", "dataset with no usable clip"),
    ("Paths", "model names with .. or absolute paths"),
    ("Paths", "output names with .. or absolute paths"),
    ("Paths", "Video Dataset folder outside input"),
    ("Server", "after the matrix: server still up, normal upscale correct"),
)

NOTES = {
    ("Models", "Wan2.1 DiT with a Wan2.2 VAE"):
        "substituted: ComfyUI builds every Wan2.2 VAE at full width (dim 160, comfy/sd.py), so there is no tiny "
        "one. Tested: a 48-channel latent into the Wan2.1 DiT (in process), a 48-channel VAE against the Wan2.1 "
        "DiT (the pack's VAE check), and the mirror case on the server (tiny Wan2.2 TI2V DiT + Wan2.1 VAE).",
    ("Video", "zero frames"):
        "on the server ComfyUI's own Get Video Components fails before any pack node runs (its message, not "
        "ours): asserted one-line error, no output, server up; make demo and the streaming node name it.",
    ("Video", "a file that is not a video"):
        "the example graph fails in ComfyUI's Get Video Components (its message); the streaming node and make "
        "demo say 'not a video file'.",
    ("Video", "two audio streams"):
        "the example graph keeps the first (ComfyUI's Get Video Components/Create Video carry one track); the "
        "streaming node copies both.",
    ("Video", "animated webp"):
        "Load Video cannot decode it (ffmpeg); Load Image gives its frames and the short-clip graph upscales them; "
        "the streaming node refuses it naming that fix; the training dataset reads it through Pillow.",
    ("Runs", "interrupt during training checkpoint write"):
        "ComfyUI's interrupt is a flag checked between steps, so it cannot cut a write in half: on the server an "
        "interrupt with a checkpoint every step leaves only complete checkpoints; SIGKILL halfway through each "
        "checkpoint file is tested in process (tests/test_training.py).",
    ("Paths", "model names with .. or absolute paths"):
        "ComfyUI's prompt validation refuses names not in the folder's list; the pack's loaders resolve names "
        "through folder_paths only.",
    ("Paths", "Video Dataset folder outside input"):
        "by design an absolute folder may be anywhere (it is only read); a relative folder is a folder inside "
        "input/ and '..' out of it is refused.",
}
