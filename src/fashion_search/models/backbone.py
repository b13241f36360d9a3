"""A thin wrapper over OpenCLIP: any architecture, pretrained tag / local file / none, offline fail-fast."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fashion_search.errors import FashionSearchError, PretrainedUnavailableError
from fashion_search.models import COMPACT_MODELS, CONFIG_DIR
from fashion_search.models.features import QueryFeatures
from fashion_search.models.openclip_import import enable_transformers, needs_transformers, open_clip

open_clip.add_model_config(CONFIG_DIR)
HUB_HOST = "huggingface.co"
NO_PRETRAINED = ("none", "", "random")


@dataclass(frozen=True)
class BackboneSpec:
    """What it takes to rebuild a backbone: the architecture and where its initial weights came from."""

    model: str
    pretrained: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


def list_models() -> list[str]:
    """Every architecture name `--model` accepts (OpenCLIP's plus the project's compact ones)."""
    return open_clip.list_models()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """An explicit device wins; otherwise CUDA, then Apple's MPS, then the CPU."""
    if device not in (None, "", "auto"):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise FashionSearchError(f"unknown device {device!r} ({exc})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise FashionSearchError(f"device {device!r} requested but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """Mixed precision on GPU (bf16 where supported, else fp16); a no-op context on the CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _hub_reachable(timeout: float = 3.0) -> bool:
    # DNS lookups ignore socket timeouts, so the whole probe runs in a thread with a deadline.
    def probe() -> bool:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(probe).result(timeout=timeout + 0.5)
    except Exception:
        return False
    finally:
        pool.shutdown(wait=False)


def _cached_weights(model: str, tag: str, cache_dir: str | None) -> str | None:
    """The local file of a pretrained tag when a previous download left it in the HF cache."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo = (cfg.get("hf_hub") or "").rstrip("/")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _resolve_pretrained(model: str, pretrained: str, cache_dir: str | None) -> tuple[str | None, dict]:
    """Map `--pretrained` to what open_clip should load, plus preprocessing overrides for a cached tag."""
    if pretrained.lower() in NO_PRETRAINED:
        return None, {}
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not os.path.isfile(pretrained):
            raise FashionSearchError(f"pretrained weights file not found: {pretrained}")
        return pretrained, {}
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none published"
        raise FashionSearchError(
            f"unknown pretrained tag {pretrained!r} for {model} (known: {known}; or a local file, or 'none')"
        )
    if _hub_reachable():
        return pretrained, {}
    cached = _cached_weights(model, pretrained, cache_dir)
    if cached is None:
        raise PretrainedUnavailableError(
            f"cannot download pretrained weights {model}/{pretrained}: {HUB_HOST} is unreachable and they are "
            "not in the local cache; pass a local weights file with --pretrained /path/to/open_clip_model.safetensors, "
            "point HF_HOME at a cache that holds them, or use --pretrained none"
        )
    # Loading the file by path keeps open_clip offline; the tag's own normalisation must come along.
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    keys = ("mean", "std", "interpolation", "resize_mode")
    return cached, {k: cfg[k] for k in keys if k in cfg}


def _causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """open_clip's text attention mask (TextTransformer.build_causal_mask): -inf above the diagonal."""
    return mask.fill_(float("-inf")).triu_(1)


# Buffers that open_clip derives from the config instead of storing in the weights, by name.
_DERIVED_BUFFERS = {"attn_mask": _causal_mask}


def _build_uninitialised(model: str, device: torch.device, **kwargs) -> nn.Module | None:
    """The architecture with real but uninitialised storage, for a caller that loads every weight next:
    built on the meta device (no memory, no random init: most of a ViT's construction time), then given
    storage on `device`. None when it holds a derived buffer this module cannot rebuild."""
    with torch.device("meta"):
        clip = open_clip.create_model(model, pretrained=None, device="meta", **kwargs)
    derived = [name for name, _ in clip.named_buffers() if name not in clip.state_dict()]
    if any(name.rsplit(".", 1)[-1] not in _DERIVED_BUFFERS for name in derived):
        return None
    clip = clip.to_empty(device=device)
    with torch.no_grad():
        for name in derived:
            _DERIVED_BUFFERS[name.rsplit(".", 1)[-1]](clip.get_buffer(name))
    return clip


def _loads_every_weight(model: str, weights: str | None) -> bool:
    """Whether open_clip's pretrained load overwrites every weight of the model it builds: a full,
    strict load of a plain config's file. hf-hub:/local-dir: models find (or miss) their own weights
    and only log when none are found; big_vision .npz/.npy files are loaded without a strictness check."""
    if weights is None or model.startswith(("hf-hub:", "local-dir:")):
        return False
    return not weights.lower().endswith((".npz", ".npy"))


@contextlib.contextmanager
def _logging_disabled(level: int):
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def normalise_preprocess_cfg(cfg: dict) -> dict:
    """JSON turns tuples into lists; open_clip's transforms expect tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


class ClipBackbone(nn.Module):
    """An OpenCLIP model with its tokenizer and preprocessing config; returns L2-normalised features."""

    def __init__(self, clip: nn.Module, tokenizer, preprocess_cfg: dict, spec: BackboneSpec):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.preprocess_cfg = normalise_preprocess_cfg(preprocess_cfg)
        self.spec = spec

    @property
    def dim(self) -> int:
        return (
            int(self.clip.text_projection.shape[1])
            if hasattr(self.clip, "text_projection")
            else int(self.clip.visual.output_dim)
        )

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids; over-long texts are truncated to the context length, empty ones refused."""
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise FashionSearchError("text query is empty")
        return self.tokenizer(list(texts))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    # -- token features, for a fusion that reads them (the query side only; the index stays pooled) --
    def image_query_features(self, pixels: torch.Tensor) -> QueryFeatures:
        """Pooled embedding (normalised) + the tower's spatial tokens in the joint space: a ViT's patch
        tokens through its own projection, as `image_features` projects the pooled token, or a ResNet's
        final feature map through its attention pool's value and output projections (MaskCLIP's dense
        features: what each location contributes to the pooled embedding)."""
        visual = self.clip.visual
        if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            pooled, tokens = _resnet_tokens(visual, pixels)
            return QueryFeatures(F.normalize(pooled.float(), dim=-1), self._joint(tokens.float()))
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise FashionSearchError(
                f"the attention fusion needs an OpenCLIP ViT or ResNet image tower; {self.spec.model} has "
                f"{type(visual).__name__}"
            )
        # open_clip's own switch for returning tokens. Flipped for this call only: every forward runs
        # on one thread (the engine's model thread, the training loop), so no other caller sees it.
        previous, visual.output_tokens = visual.output_tokens, True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = previous
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return QueryFeatures(F.normalize(pooled.float(), dim=-1), self._joint(tokens.float()))

    def text_query_features(self, tokens: torch.Tensor) -> QueryFeatures:
        """Pooled embedding (normalised) + every token's final state, projected like the pooled one;
        padding is masked out."""
        # The standard CLIP keeps its text tower's parts on itself, a custom-text CLIP under .text.
        tower = getattr(self.clip, "text", self.clip)
        final_norm, projection = getattr(tower, "ln_final", None), getattr(tower, "text_projection", None)
        if final_norm is None:
            raise FashionSearchError(f"the attention fusion cannot read {self.spec.model}'s text tokens")
        states: list[torch.Tensor] = []
        # The final LayerNorm sees every token's state before pooling picks one: the one hook point that
        # leaves open_clip's own encode_text (and its pooling rule) in charge.
        hook = final_norm.register_forward_hook(lambda _m, _i, out: states.append(out))
        try:
            pooled = self.clip.encode_text(tokens)
        finally:
            hook.remove()
        if not states or states[-1].ndim != 3 or states[-1].shape[1] != tokens.shape[1]:
            raise FashionSearchError(f"the attention fusion cannot read {self.spec.model}'s text tokens")
        hidden = states[-1]
        if isinstance(projection, nn.Linear):
            hidden = projection(hidden)
        elif projection is not None:
            hidden = hidden @ projection
        mask = tokens != getattr(tower, "pad_id", 0)
        return QueryFeatures(F.normalize(pooled.float(), dim=-1), self._joint(hidden.float()), mask)

    def _joint(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.dim:
            raise FashionSearchError(
                f"the attention fusion cannot use {self.spec.model}: its tokens have {tokens.shape[-1]} "
                f"channels, not the joint space's {self.dim}"
            )
        return tokens


def _convolutional(visual: nn.Module) -> bool:
    """A tower of convolutions (a ResNet, a ConvNeXt), not a ViT with its one patch-embedding conv."""
    return sum(isinstance(m, nn.Conv2d) for m in visual.modules()) > 1


def _resnet_tokens(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The pooled embedding from open_clip's own forward; the map its attention pool reads, from a hook.
    maps: list[torch.Tensor] = []
    hook = visual.attnpool.register_forward_pre_hook(lambda _m, args: maps.append(args[0]))
    try:
        pooled = visual(pixels)
    finally:
        hook.remove()
    pool = visual.attnpool
    grid = maps[-1].flatten(2).transpose(1, 2)  # (n, H*W, C)
    grid = grid + pool.positional_embedding[1:].to(grid.dtype)  # index 0 is the mean token's
    return pooled, pool.c_proj(pool.v_proj(grid))


def _build_initialised(model: str, weights: str | None, device: torch.device, options: dict) -> nn.Module:
    # open_clip logs a root-level warning for random init, which is what `none` asks for.
    quiet = contextlib.nullcontext() if weights else _logging_disabled(logging.WARNING)
    # `--pretrained none` must mean the same weights in every process (an index built with them is
    # queried later by another process), so random initialisation is seeded, without touching the
    # caller's random state. open_clip builds on the CPU (then moves the model), so only the CPU
    # generator is seeded: torch.manual_seed would also reset every GPU's, which fork_rng (CPU only
    # here, so as not to start CUDA) would not put back.
    with quiet, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        return open_clip.create_model(model, pretrained=weights, device=device, **options)


def create_backbone(
    model: str,
    pretrained: str = "none",
    device: torch.device | str | None = None,
    cache_dir: str | None = None,
    init_weights: bool = True,
) -> ClipBackbone:
    """Build an OpenCLIP backbone by architecture name and weight source.

    `init_weights=False` (with `pretrained="none"`) leaves the weights uninitialised, for a caller that
    loads all of them next with a strict load (load_checkpoint); a pretrained file that is loaded in full
    skips the random init too.
    """
    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        compact = ", ".join(COMPACT_MODELS)
        raise FashionSearchError(
            f"unknown model {model!r}: use an OpenCLIP architecture (e.g. ViT-B-32) or a compact one ({compact})"
        )
    if model.startswith(("hf-hub:", "local-dir:")) or needs_transformers(model):
        enable_transformers()  # its config is not known here, or it names a Hugging Face text tower
    weights, preprocess_overrides = _resolve_pretrained(model, pretrained, cache_dir)
    options = {"cache_dir": cache_dir, "force_preprocess_cfg": preprocess_overrides or None}
    dev = resolve_device(device)
    try:
        clip = None
        local = weights is None or os.path.isfile(weights)  # a tag online: open_clip's own download and load
        if local and (not init_weights or _loads_every_weight(model, weights)):
            with _logging_disabled(logging.WARNING):  # open_clip warns of the random init it skips
                clip = _build_uninitialised(model, dev, **options)
            if clip is not None and weights:
                open_clip.load_checkpoint(clip, weights)  # strict: a missing weight is an error
        if clip is None:
            clip = _build_initialised(model, weights, dev, options)
    except FashionSearchError:
        raise
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise FashionSearchError(f"cannot create model {model} with weights {pretrained!r}: {exc}") from None
    except Exception as exc:
        if not (weights and os.path.isfile(weights)):
            raise
        # torch.load and safetensors answer a corrupt file with whatever their parsers hit (IndexError,
        # UnpicklingError, SafetensorError...): all of them mean the file is not usable weights.
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise FashionSearchError(
            f"weights file {pretrained} is corrupt or not in a format open_clip reads ({reason})"
        ) from None
    if _convolutional(clip.visual):
        # oneDNN's convolution, batch-norm and pooling kernels run faster on channels-last (GPU: untested)
        # tensors: fs-rn-tiny's tower trains and embeds 1.4-1.6x faster on 2 CPU cores
        # (benchmarks/bench_memory_format.py; a whole demo step gains less, its loader and text tower
        # are unchanged). Checkpoints load into it and save from it unchanged.
        clip.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(model)
    preprocess_cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    return ClipBackbone(clip, tokenizer, preprocess_cfg, BackboneSpec(model, pretrained))
