"""The pack's folders. The model folder is registered with ComfyUI on import (0.3.75 never calls
ComfyExtension.on_load, and node schemas list the folder as soon as they are built)."""
import os

import folder_paths

ADAPTER_FOLDER = "litevsr"
TRAINING_OUTPUT = "litevsr_training"  # checkpoints: output/litevsr_training/<run_name>/

folder_paths.add_model_folder_path(ADAPTER_FOLDER, os.path.join(folder_paths.models_dir, ADAPTER_FOLDER))
