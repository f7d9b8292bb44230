"""bpd throughput (images/s) and peak memory of the density prior at 64² and 128².

Each setting runs in a fresh process so that the CPU peak resident memory (ru_maxrss) belongs to it
alone; on CUDA the peak is ``torch.cuda.max_memory_allocated``. Two modes: ``eval`` (no grad, as in
bpd tables) and ``grad`` (gradient w.r.t. the input, as in simplifier training).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prior.py [--prior P] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def measure(prior: str | None, size: int, batch: int, mode: str, repeats: int, device: str, queue) -> None:
    import torch

    from pipeline.models.bpd import bits_per_dim
    from pipeline.prior import load_prior
    from pipeline.runtime.device import autocast

    torch.manual_seed(0)
    dev = torch.device(device)
    model = load_prior(prior, device=dev)
    x = (torch.randint(0, 256, (batch, 1, size, size)) / 255.0).to(dev)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        with autocast(dev):
            if mode == "grad":
                xg = x.clone().requires_grad_(True)
                bits_per_dim(model, xg).sum().backward()
            else:
                with torch.no_grad():
                    bits_per_dim(model, x, dequantize="midpoint")
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    queue.put({"device": device, "size": size, "batch": batch, "mode": mode,
               "images_per_s": batch / seconds, "peak_mb_above_model": peak_mb})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default=None, help="prior .safetensors (default: shipped)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ctx = mp.get_context("spawn")
    rows = []
    for device in devices:
        for size in args.sizes:
            for mode in ("eval", "grad"):
                queue = ctx.Queue()
                proc = ctx.Process(target=measure,
                                   args=(args.prior, size, args.batch, mode, args.repeats, device, queue))
                proc.start()
                rows.append(queue.get())
                proc.join()
                r = rows[-1]
                print(f"{r['device']:5s} {r['size']:4d}px batch {r['batch']:3d} {r['mode']:4s}: "
                      f"{r['images_per_s']:8.1f} images/s, peak +{r['peak_mb_above_model']:7.1f} MB",
                      flush=True)
    if len(args.sizes) > 1:
        for device in devices:
            for mode in ("eval", "grad"):
                by_size = {r["size"]: r["images_per_s"] for r in rows
                           if r["device"] == device and r["mode"] == mode}
                lo, hi = min(by_size), max(by_size)
                print(f"{device} {mode}: throughput ratio {lo}px / {hi}px = {by_size[lo] / by_size[hi]:.2f} "
                      f"(pixel ratio {(hi / lo) ** 2:.0f})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
