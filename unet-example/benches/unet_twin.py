"""The default U-Net of unet-example, rebuilt in PyTorch, timed per training step.

Same network (widths 12/24/48/96, two 3x3 conv-BN-ReLU per level without conv bias,
2x2 stride-2 transposed convolutions with bias, a 1x1 head with bias, 15 classes,
271,875 parameters; `--base-width 8` gives the pilot's 121,159), same batch (4 x 1 x
112 x 96, read from the file the Rust `step_time` example writes with `--write-batch`),
same step: forward in training mode,
cross-entropy (ignore 255), optionally + the authors' Lovasz-Softmax on the softmax of
the logits (classes 'present', void 255), backward, AdamW (PyTorch's defaults, lr 1e-3).

    python unet_twin.py --batch BATCH --reference lovasz_losses.py [--steps 20] [--mode ce|lovasz|both]
        [--base-width 12] [--device cpu|cuda]

Prints one line per mode: `torch <mode>: <ms> ms/step (<steps> steps, ...)`; on CUDA
(cuDNN as PyTorch configures it by default) each step ends with a synchronise, as the
Rust example's do, and the line adds the peak memory PyTorch's allocator held.
`run_step_ratio.sh` runs it side by side with the Rust example.
"""

import argparse
import importlib.util
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, cin=1, classes=15, base=12, depth=4):
        super().__init__()
        widths = [base << i for i in range(depth)]
        self.down = nn.ModuleList(
            block(cin if i == 0 else widths[i - 1], widths[i]) for i in range(depth)
        )
        self.upconv = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth - 1))
        )
        self.upblock = nn.ModuleList(
            block(2 * widths[i], widths[i]) for i in reversed(range(depth - 1))
        )
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, b in enumerate(self.down):
            x = b(x)
            if i + 1 < len(self.down):
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, b in zip(self.upconv, self.upblock):
            x = b(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def read_batch(path):
    """The file of `step_time --write-batch`: u32 little-endian B, C, H, W, then B*C*H*W
    f32 images, then B*H*W u8 labels."""
    raw = open(path, "rb").read()
    b, c, h, w = (int.from_bytes(raw[4 * i : 4 * i + 4], "little") for i in range(4))
    n_img = b * c * h * w
    images = torch.frombuffer(bytearray(raw[16 : 16 + 4 * n_img]), dtype=torch.float32)
    labels = torch.frombuffer(bytearray(raw[16 + 4 * n_img :]), dtype=torch.uint8)
    if labels.numel() != b * h * w:
        raise SystemExit(f"{path}: expected {b * h * w} labels, got {labels.numel()}")
    return images.reshape(b, c, h, w).clone(), labels.reshape(b, h, w).long()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", required=True)
    ap.add_argument("--reference", required=True, help="the authors' lovasz_losses.py")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", choices=["ce", "lovasz", "both"], default="both")
    ap.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    ap.add_argument("--base-width", type=int, default=12, help="channels of the first level")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("lovasz_losses", args.reference)
    L = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(L)

    images, labels = read_batch(args.batch)
    images, labels = images.to(dev), labels.to(dev)
    torch.manual_seed(0)
    modes = ["ce", "lovasz"] if args.mode == "both" else [args.mode]
    for mode in modes:
        model = UNet(cin=images.shape[1], base=args.base_width).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, ignore_index=255)
            if mode == "lovasz":
                probas = F.softmax(logits, dim=1)
                loss = loss + L.lovasz_softmax(probas, labels, ignore=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()

        step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        ms = (time.perf_counter() - t) * 1e3 / args.steps
        where = (f"cuda, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                 if cuda else f"{torch.get_num_threads()} threads")
        print(f"torch {mode}: {ms:.1f} ms/step ({args.steps} steps, batch {images.shape[0]}, "
              f"{where}, {sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
