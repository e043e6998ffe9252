"""What the front end shows: every pack node has a description, every input a tooltip (from the live server)."""

PACK_NODES = {"LiteVSRAttachAdapter", "LiteVSREncodeVideo", "LiteVSRSampler", "LiteVSRTiledDecode",
              "LiteVSRColorCorrect", "LiteVSRUpscaleVideoFile", "LiteVSRVideoDataset", "LiteVSRDegradation",
              "LiteVSRTrainAdapter", "LiteVSRDistillAdapter", "LiteVSRSaveAdapter", "LiteVSRCheckModels",
              "LiteVSRCompare", "LiteVSRLoadInfVSR", "LiteVSRLoadInfVSRReference"}


def test_every_node_is_documented(object_info):
    pack = {name: info for name, info in object_info.items() if info.get("category", "").split("/")[0] == "LiteVSR"}
    assert set(pack) == PACK_NODES
    for name, info in pack.items():
        assert len(info.get("description", "")) > 40, name
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_adapter_folder_is_one_of_comfyuis_model_folders(comfy):
    """models/litevsr is registered with ComfyUI, so its files appear in the model lists (GET /models/litevsr)."""
    assert "litevsr" in comfy.get("/models")
    assert isinstance(comfy.get("/models/litevsr"), list)
