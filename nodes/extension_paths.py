"""The pack's model folder, registered with ComfyUI on import (0.3.75 never calls ComfyExtension.on_load, and
node schemas list the folder as soon as they are built)."""
import os

import folder_paths

ADAPTER_FOLDER = "litevsr"

folder_paths.add_model_folder_path(ADAPTER_FOLDER, os.path.join(folder_paths.models_dir, ADAPTER_FOLDER))
