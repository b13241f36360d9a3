"""Models: the OpenCLIP backbone, fusion modules and checkpoints."""
