"""Models: the OpenCLIP backbone, fusion modules and checkpoints."""

from pathlib import Path

# The project's own compact architectures (CPU training, the demo and tests) are plain OpenCLIP
# model configs: data, not code branches. Here, not in backbone, so that the CLI can name them without
# importing torch.
CONFIG_DIR = Path(__file__).parent / "configs"
COMPACT_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
