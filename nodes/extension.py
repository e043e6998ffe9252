"""Registers the pack's nodes with ComfyUI (V3 extension API)."""
from comfy_api.latest import ComfyExtension, io

from .compare_nodes import LiteVSRCompare
from .decode_nodes import LiteVSRColorCorrect, LiteVSRTiledDecode
from .distill_nodes import LiteVSRDistillAdapter
from .infvsr_nodes import LiteVSRLoadInfVSR, LiteVSRLoadInfVSRReference
from .model_check_nodes import LiteVSRCheckModels
from .model_nodes import LiteVSRAttachAdapter
from .sample_nodes import LiteVSRSampler
from .stream_nodes import LiteVSRUpscaleVideoFile
from .train_nodes import LiteVSRDegradation, LiteVSRSaveAdapter, LiteVSRTrainAdapter, LiteVSRVideoDataset
from .video_nodes import LiteVSREncodeVideo


class LiteVSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LiteVSRAttachAdapter, LiteVSREncodeVideo, LiteVSRSampler, LiteVSRTiledDecode, LiteVSRColorCorrect,
                LiteVSRUpscaleVideoFile, LiteVSRVideoDataset, LiteVSRDegradation, LiteVSRTrainAdapter,
                LiteVSRDistillAdapter, LiteVSRSaveAdapter, LiteVSRCheckModels, LiteVSRCompare, LiteVSRLoadInfVSR,
                LiteVSRLoadInfVSRReference]
