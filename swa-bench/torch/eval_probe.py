"""Evaluation and BatchNorm-recomputation throughput of PyTorch on torch_ref.py's networks.

  python eval_probe.py TORCH_REF MODEL BATCH BATCHES PASSES

imports the reference networks from TORCH_REF (the path of torch_ref.py), builds MODEL for 100 classes,
and on BATCHES random CIFAR-shaped batches of BATCH images times PASSES passes of each of:

- evaluation as the original SWA code runs it: model.eval() under torch.no_grad(), the cross-entropy
  loss and the predicted class of every batch;
- torch.optim.swa_utils.update_bn over the list of batches (which runs the model in training mode).

One untimed pass of each comes first. Every timed pass prints one line `KIND MODEL bBATCH xBATCHES: R img/s`
with KIND `eval` or `update_bn`. A model without BatchNorm prints no update_bn lines, as update_bn leaves
it untouched. The thread count is the THREADS environment variable (2 by default).
"""
import importlib.util
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn


def load_reference(path):
    spec = importlib.util.spec_from_file_location("torch_ref", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import the PyTorch reference networks from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(model, batches):
    model.eval()
    loss, hits = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            hits += (out.argmax(1) == y).sum().item()
    return loss, hits


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    reference, name = sys.argv[1], sys.argv[2]
    batch, count, passes = (int(v) for v in sys.argv[3:6])
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    models = load_reference(reference).MODELS
    if name not in models:
        sys.exit(f"unknown model {name!r}: {reference} defines {', '.join(models)}")
    torch.manual_seed(0)
    model = models[name](100)
    batches = [(torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))) for _ in range(count)]
    images = [x for x, _ in batches]
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    label = f"{name} b{batch} x{count}"

    evaluate(model, batches)
    for _ in range(passes):
        seconds = timed(lambda: evaluate(model, batches))
        print(f"eval {label}: {batch * count / seconds:.2f} img/s", flush=True)
    if has_bn:
        update_bn(images, model)
        for _ in range(passes):
            seconds = timed(lambda: update_bn(images, model))
            print(f"update_bn {label}: {batch * count / seconds:.2f} img/s", flush=True)


if __name__ == "__main__":
    main()
