"""Check Models: which of the supported model files ComfyUI can see, which are missing, and where each one goes."""
import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from . import extension_paths  # noqa: F401 - registers models/litevsr and models/infvsr, which the report lists
from .decoders import tiny_decoder_support
from .model_files import check, load_manifest


class HashProgress:
    """A progress bar over the bytes of all files being hashed; honours interrupts between chunks."""

    def __init__(self, report_files):
        self.total = sum(entry.size or 0 for entry in report_files)
        self.bar = comfy.utils.ProgressBar(max(self.total, 1))
        self.finished = 0  # bytes of files already hashed
        self.current = None

    def __call__(self, entry, done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if entry is not self.current:
            self.finished += (self.current.size or 0) if self.current is not None else 0
            self.current = entry
        self.bar.update_absolute(min(self.finished + done, self.total), self.total)


class LiteVSRCheckModels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LiteVSRCheckModels",
            display_name="Check Models (LiteVSR)",
            category="LiteVSR",
            description="Lists the model files LiteVSR supports (Wan2.1 T2V 1.3B/14B and Wan2.2 TI2V-5B DiTs, their "
                        "VAEs, the optional umt5 text encoder, the optional fast Wan decoders for the stock Load VAE "
                        "in vae/ or vae_approx/, and InfVSR's DiT in diffusion_models/ and reference encoder files "
                        "in infvsr/, with licence and source) and reports, for ComfyUI's own model folders, which "
                        "are present and intact, which are missing (with the exact path each one goes to and its "
                        "download URL) and which backbones and models are ready to use. InfVSR's PyTorch pickles "
                        "are read weights-only; the report gives the optional `python -m tools.infvsr convert` line "
                        "that turns each into safetensors once. Downloads nothing: fetch missing files with "
                        "`make models` / tools/models.py (resumable, SHA-256 verified) or by hand.",
            inputs=[
                io.Boolean.Input("verify_hash", default=False,
                                 tooltip="Also compute the SHA-256 of every present file and compare it with the "
                                         "manifest. Off: sizes only (instant). On: reads every file, minutes for "
                                         "the 14B DiTs."),
            ],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="The report as text (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # files come and go between runs: never reuse a cached report

    @classmethod
    def execute(cls, verify_hash) -> io.NodeOutput:
        manifest = load_manifest()
        progress = HashProgress(manifest.files) if verify_hash else None
        text = check(manifest, folder_paths.get_folder_paths, verify_hash, progress).text(verify_hash)
        unsupported = tiny_decoder_support()
        if unsupported:
            text += "\n" + unsupported
        return io.NodeOutput(text, ui=ui.PreviewText(text))
