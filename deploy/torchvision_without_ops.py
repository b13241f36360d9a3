"""Let a CUDA-linked torchvision import beside a CPU-only torch (build step, TORCHVISION_WITHOUT_OPS=1).

PyPI's torchvision wheels link their C++ operators (_C: nms, roi_align, ...) against torch's CUDA
libraries. Beside a CPU torch of the same version _C cannot load, and torchvision's import then fails
in _meta_registrations ("operator torchvision::nms does not exist"): two of its fake-tensor
registrations lack the `_has_ops()` guard that its own register_meta has. This adds that guard. Only
the operators stay unavailable; fashion-search uses torchvision's transforms, never those operators.
A torchvision whose _C loads (a matching CPU or CUDA build) is left untouched.
"""

import importlib.util
import subprocess
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or not spec.submodule_search_locations:
    sys.exit("torchvision is not installed")
root = spec.submodule_search_locations[0]
probe = "import torch, torchvision.extension as e; raise SystemExit(0 if e._has_ops() else 1)"
if subprocess.run([sys.executable, "-c", probe]).returncode == 0:
    print("torchvision's operators load: nothing to change")
    sys.exit(0)

path = f"{root}/_meta_registrations.py"
text = open(path).read()
guard = """

def _register_fake_if_ops(op_name):
    # As register_meta: nothing to register when torchvision's _C operators did not load.
    return torch.library.register_fake(op_name) if torchvision.extension._has_ops() else (lambda fn: fn)
"""
anchor = "\n\n@functools.lru_cache(None)\ndef get_meta_lib"
if "_register_fake_if_ops" not in text:
    if anchor not in text:
        sys.exit(f"{path}: unexpected layout, not patched")
    text = text.replace(
        '@torch.library.register_fake("torchvision::', '@_register_fake_if_ops("torchvision::'
    )
    text = text.replace(anchor, guard + anchor, 1)
    open(path, "w").write(text)
check = "import torchvision.transforms as T; from PIL import Image; T.ToTensor()(Image.new('RGB', (4, 4)))"
subprocess.run([sys.executable, "-c", check], check=True)
print(f"patched {path}: torchvision imports without its C++ operators")
