"""The pack's folders. The model folder is registered with ComfyUI on import (0.3.75 never calls
ComfyExtension.on_load, and node schemas list the folder as soon as they are built)."""
import os

import folder_paths

ADAPTER_FOLDER = "litevsr"
INFVSR_FOLDER = "infvsr"  # InfVSR's reference encoder files (RAM Swin-L, DAPE); its DiT goes to diffusion_models
TRAINING_OUTPUT = "litevsr_training"  # checkpoints: output/litevsr_training/<run_name>/

for folder in (ADAPTER_FOLDER, INFVSR_FOLDER):
    folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.models_dir, folder))
