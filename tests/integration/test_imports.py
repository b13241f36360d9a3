"""What a fresh interpreter imports: `import fashion_search` stays light, and `transformers` is imported
only for the models that need it (each checked in a new process, the only clean slate for sys.modules)."""

import os
import subprocess
import sys
import textwrap


def test_the_library_imports_without_its_faces_and_training_packages():
    """`import fashion_search` and the engine must not pull in the HTTP or page frameworks."""
    probe = (
        "import sys, fashion_search, fashion_search.service.engine, fashion_search.index.registry; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'streamlit') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_import_is_light():
    code = "import sys, fashion_search; bad = [m for m in ('torch', 'streamlit', 'fastapi') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


FAKE_TRANSFORMERS = """
import os
open(os.environ["FAKE_TRANSFORMERS_LOG"], "a").write("imported\\n")
class _Any:
    def __init__(self, *a, **k): pass
AutoModel = AutoTokenizer = AutoConfig = PretrainedConfig = _Any
LogitsProcessorList = TopPLogitsWarper = TopKLogitsWarper = RepetitionPenaltyLogitsProcessor = _Any
MinLengthLogitsProcessor = MaxLengthCriteria = StopStringCriteria = EosTokenCriteria = _Any
StoppingCriteriaList = BeamSearchScorer = _Any
"""


def test_transformers_is_imported_only_for_models_that_need_it(tmp_path):
    """open_clip imports an installed `transformers` (seconds of start-up) even for ViT-B-32: ours
    does not, until a model with a Hugging Face text tower (or CoCa) is built."""
    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_TRANSFORMERS)
    (fake / "modeling_outputs.py").write_text(
        "BaseModelOutput = BaseModelOutputWithPooling = BaseModelOutputWithPoolingAndCrossAttentions = object\n"
    )
    log = tmp_path / "imports.log"
    script = textwrap.dedent(
        """
        import sys
        from fashion_search.models.checkpoint import create_model
        from fashion_search.models.openclip_import import enable_transformers, needs_transformers, open_clip
        create_model("fs-micro", "none", device="cpu")
        print("after fs-micro:", "transformers" in sys.modules, open_clip.hf_model.transformers is None)
        assert needs_transformers("mt5-base-ViT-B-32") and not needs_transformers("ViT-B-32")
        enable_transformers()
        print("after enable:", "transformers" in sys.modules, open_clip.hf_model.transformers is None)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["FAKE_TRANSFORMERS_LOG"] = str(log)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after fs-micro: False True" in proc.stdout
    assert "after enable: True False" in proc.stdout and log.read_text() == "imported\n"
