"""Forward + backward timing of the authors' Lovász-Softmax (PyTorch) on a CUDA GPU, the
peer of `examples/gpu_bench.rs` in `scripts/gpu-check.sh`: the same shapes, classes
present (the authors' default), probabilities that require a gradient, the loss, its
backward and a synchronisation per run; the median of --reps runs after two warm-ups.

    python3 gpu_reference.py --reference path/to/lovasz_losses.py --shape 10,20,300,300 [--per-image]

The authors' file is loaded from the path given (it is not part of this project). Prints
one summary line and, last, `median_s=<seconds>`.
"""

import argparse
import importlib.util
import time

import torch


def load(path):
    spec = importlib.util.spec_from_file_location("lovasz_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--shape", default="10,20,300,300")
    ap.add_argument("--per-image", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    ref = load(args.reference)
    b, c, h, w = (int(v) for v in args.shape.split(","))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    probas = torch.softmax(torch.randn(b, c, h, w, device=dev), dim=1).requires_grad_()
    labels = torch.randint(0, c, (b, h, w), device=dev)

    def step():
        probas.grad = None
        loss = ref.lovasz_softmax(probas, labels, classes="present", per_image=args.per_image)
        loss.backward()
        torch.cuda.synchronize()

    step()
    step()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    print(
        f"authors' pytorch softmax {b}x{c}x{h}x{w} per_image={args.per_image}: fwd+bwd median "
        f"{median * 1e3:.3f} ms (min {times[0] * 1e3:.3f}, max {times[-1] * 1e3:.3f}) over "
        f"{len(times)} runs; torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
    )
    print(f"median_s={median}")


if __name__ == "__main__":
    main()
