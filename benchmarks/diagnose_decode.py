"""Where a batch's decode + preprocess time goes, on the CPU and on the model's device, printed as JSON.

cpu          ms per image of one decode worker on one core: Pillow decode (draft mode) + geometry to
             uint8 (the `--decode cpu` path), and reading + header check only (the `--decode gpu` share)
device_decode one batch decoded by nvJPEG + resized on the device (DeviceJpegDecoder): wall ms and the
             host CPU ms this process spent meanwhile (nvJPEG may run Huffman decoding on the host),
             decode alone vs. decode + geometry; skipped without CUDA unless --device cpu is asked for
agreement    the device path's pixels and embeddings against Pillow's (draft and full decode)
pipeline     the indexer's own reader (data.loading.embed_paths: workers, the next batch prepared in a thread
             on a stream of its own while the forward runs) against the same images decoded one batch at
             a time with the device synchronised in between: per-image cosine of the embeddings. A value
             well under 1 on CUDA means batches corrupted each other (the nvJPEG stream hazard in
             pixels.decode_jpegs); on the CPU the reader decodes in draft mode, so ~0.999 is expected
progressive  whether a progressive JPEG decodes on the device to Pillow's pixels (today such files
             take the CPU path)
forward      the model's forward on the same batch already on the device, for scale
"""

from __future__ import annotations

import io
import os
import shutil
import time

import common
import numpy as np


def parse_args():
    p = common.base_parser(__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--n", type=int, default=256, help="JPEGs generated (one batch)")
    p.add_argument("--min-px", type=int, default=400)
    p.add_argument("--max-px", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5, help="timed device batches")
    p.add_argument("--cpu-sample", type=int, default=48, help="images timed on one core")
    p.add_argument("--pipeline-batch", type=int, default=32, help="batch size of the pipeline check")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu checks the code path)")
    p.add_argument("--keep", default=None, metavar="DIR")
    return p.parse_args()


def timed_batch(fn, device, repeat: int) -> dict:
    """Wall and host-CPU ms per call of fn (device synchronised), median over `repeat` after a warm-up."""
    fn()
    common.sync_device(device)
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        common.sync_device(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_ms": common.latency_ms(walls), "host_cpu_ms_p50": round(1000 * float(np.median(cpus)), 3)}


def pipeline_agreement(model, paths, payloads, decoder, device, batch: int) -> dict:
    import torch

    from fashion_search.data.loading import embed_paths

    ok, got, failures = embed_paths(
        model,
        paths,
        batch_size=batch,
        workers=2,
        progress=False,
        decode="gpu" if device.type == "cuda" else "cpu",
    )
    want = []
    for i in range(0, len(payloads), batch):
        pixels = decoder(payloads[i : i + batch])
        common.sync_device(device)
        want.append(model.encode_pixels(pixels))
    want = torch.cat(want)[ok]
    cosine = (got * want).sum(1)
    return {
        "images": len(ok),
        "failed": len(failures),
        "batch": batch,
        "cosine_min": round(cosine.min().item(), 6),
        "cosine_median": round(cosine.median().item(), 6),
        "below_0_999": int((cosine < 0.999).sum().item()),
    }


def main() -> None:
    args = parse_args()
    load0 = os.getloadavg()
    torch = common.import_torch(args.threads)

    from fashion_search.data.images import load_image
    from fashion_search.data.loading import ImagePathsDataset
    from fashion_search.data.pixels import DeviceJpegDecoder, decode_jpegs, device_decodable, nvjpeg_available
    from fashion_search.models.checkpoint import create_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = common.work_dir(args.keep, "diagnose-decode-")
    try:
        folder = work / "images"
        if folder.exists():
            shutil.rmtree(folder)
        common.log(f"writing {args.n} JPEGs of {args.min_px}-{args.max_px} px")
        dataset = common.make_jpeg_folder(folder, args.n, args.seed, args.min_px, args.max_px)
        paths = sorted(folder.rglob("*.jpg"))
        model = create_model(args.model, "none", device=str(device))
        pipeline, size = model.pixel_pipeline, model.backbone.image_size
        sample = list(range(min(args.cpu_sample, len(paths))))
        cpu_ds = ImagePathsDataset(paths, pipeline, size, device_jpegs=False)
        gpu_ds = ImagePathsDataset(paths, pipeline, size, device_jpegs=True)
        results: dict = {
            "model": args.model,
            "device": str(device),
            "dataset": dataset,
            "nvjpeg": nvjpeg_available(device),
            "cpu": {
                "decode_to_uint8_ms": common.ms_per_item(lambda i: cpu_ds[i], sample),
                "read_and_check_ms": common.ms_per_item(lambda i: gpu_ds[i], sample),
                "full_decode_to_uint8_ms": common.ms_per_item(
                    lambda i: pipeline.to_uint8(load_image(paths[i])), sample
                ),
            },
        }
        datas = [p.read_bytes() for p in paths]
        results["device_decodable"] = sum(device_decodable(d, 1 << 40) for d in datas)
        payloads = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        if device.type == "cuda" or args.device == "cpu":
            common.log(f"decoding {len(payloads)} JPEGs per batch on {device}")
            decoder = DeviceJpegDecoder(pipeline, device)
            results["device_decode"] = {
                "batch": len(payloads),
                "decode_only": timed_batch(lambda: decode_jpegs(payloads, device), device, args.repeat),
                "decode_and_geometry": timed_batch(lambda: decoder(payloads), device, args.repeat),
            }
            wall = results["device_decode"]["decode_and_geometry"]["wall_ms"]["p50"]
            results["device_decode"]["images_per_s"] = round(len(payloads) / wall * 1000.0, 1)
            on_device = decoder(payloads)
            ready = on_device.clone()
            results["forward"] = timed_batch(lambda: model.encode_pixels(ready), device, args.repeat)
            results["forward"]["images_per_s"] = round(
                len(payloads) / results["forward"]["wall_ms"]["p50"] * 1000.0, 1
            )

            common.log("agreement with Pillow")
            n = min(64, len(paths))
            draft = torch.stack(
                [pipeline.to_uint8(load_image(p, draft_size=(size, size))) for p in paths[:n]]
            )
            full = torch.stack([pipeline.to_uint8(load_image(p)) for p in paths[:n]])
            dev = on_device[:n].cpu()

            def diff(a, b) -> dict:
                d = (a.int() - b.int()).abs().float()
                return {"mean_levels": round(d.mean().item(), 4), "max_levels": int(d.max().item())}

            emb_dev, emb_draft = model.encode_pixels(dev), model.encode_pixels(draft)
            emb_full = model.encode_pixels(full)
            results["agreement"] = {
                "images": n,
                "device_vs_pillow_full": diff(dev, full),
                "device_vs_pillow_draft": diff(dev, draft),
                "pillow_full_vs_draft": diff(full, draft),
                "cosine_min_device_vs_draft": round((emb_dev * emb_draft).sum(1).min().item(), 6),
                "cosine_min_full_vs_draft": round((emb_full * emb_draft).sum(1).min().item(), 6),
            }

            common.log("the indexer's reader against batches decoded one at a time")
            results["pipeline"] = pipeline_agreement(
                model, paths, payloads, decoder, device, args.pipeline_batch
            )

            from PIL import Image

            buf = io.BytesIO()
            Image.open(paths[0]).save(buf, "JPEG", quality=90, progressive=True)
            prog = buf.getvalue()
            try:
                got = decoder([torch.frombuffer(bytearray(prog), dtype=torch.uint8)]).cpu()
                want = pipeline.to_uint8(load_image(prog))[None]
                results["progressive"] = {"decoded": True, **diff(got, want)}
            except RuntimeError as exc:
                results["progressive"] = {"decoded": False, "error": str(exc)[:200]}
        common.emit("diagnose_decode", args, load0, {"results": results, "goals": []})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
