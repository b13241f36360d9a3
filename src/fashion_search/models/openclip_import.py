"""open_clip, imported without Hugging Face `transformers` until a model needs it.

When `transformers` is installed, `import open_clip` imports it too (for CoCa's caption generator and
Hugging Face text towers, module-level `try: from transformers import ...`): seconds of every start-up
(`benchmarks/diagnose_index.py startup` shows it) for models that never use it: ViT-B-32 and the
packaged fs-* configs have open_clip's own text tower. Hugging Face *tokenizers* (SigLIP, ...) are
imported by open_clip lazily and need nothing from here.

So open_clip is imported with `transformers` refused (its modules take their no-transformers branch),
and `enable_transformers()` re-runs those two modules for a model whose config names a Hugging Face
text tower or is a CoCa model -- before it is built (backbone.create_backbone calls it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys


class _RefuseTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(
                f"{name} is imported only for models that need it (fashion_search openclip_import)"
            )
        return None


def _import_open_clip():
    if "open_clip" in sys.modules or "transformers" in sys.modules:  # nothing left to save
        import open_clip

        return open_clip
    refuse = _RefuseTransformers()
    sys.meta_path.insert(0, refuse)
    try:
        import open_clip
    finally:
        sys.meta_path.remove(refuse)
    return open_clip


open_clip = _import_open_clip()


def needs_transformers(model_name: str) -> bool:
    """True for open_clip configs with a Hugging Face text tower, and for CoCa models."""
    cfg = open_clip.get_model_config(model_name) or {}
    return bool(cfg.get("text_cfg", {}).get("hf_model_name")) or "multimodal_cfg" in cfg


def enable_transformers() -> None:
    """Re-import the open_clip modules that bind `transformers` at import (once; a no-op when it is not
    installed, and then open_clip reports what is missing as it always does)."""
    from open_clip import coca_model, hf_model

    if hf_model.transformers is not None or importlib.util.find_spec("transformers") is None:
        return
    importlib.reload(hf_model)
    importlib.reload(coca_model)
