"""The `quick` preset of `cargo xtask reproduce cifar10` in PyTorch, for a side-by-side check of accuracy.

    python xtask/torch/quick_reference.py --data DIR [--seed N] [--threads N] [--out FILE]

DIR holds the official CIFAR-10 binary files (data_batch_1..5.bin, test_batch.bin). The protocol is the
preset's, with PyTorch's own tools: PreResNet-20 from swa-bench/torch/torch_ref.py (the original
SWA code's network), batch 128, SGD with momentum 0.9 and weight decay 3e-4 on every parameter, random
crops of the zero-padded image (4 pixels) and horizontal flips, then the CIFAR mean/std normalisation;
the original code's learning-rate schedule (lr 0.1, constant to half the horizon, linear to the final
ratio by 90%, then constant):

  - SGD: 16 epochs (one budget), decaying to 1% of lr 0.1;
  - SWA: 24 epochs (1.5 budgets) with horizon swa_start = 13 and final lr 0.01;
    torch.optim.swa_utils.AveragedModel takes the weights after every epoch from epoch 13 on, and the
    average is evaluated after epochs 16, 20 and 24, its BatchNorm statistics recomputed first with
    swa_utils.update_bn over the augmented training set.

The two runs train identically for their first 7 epochs (same seed, same learning rate), so the SGD run
starts from the SWA run's state after epoch 7, as xtask does. Prints and writes (as JSON) the test
accuracy of SGD after 16 epochs and of SWA after 16, 20 and 24.
"""
import argparse, copy, json, os, sys, time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', 'swa-bench', 'torch'))
import torch_ref  # noqa: E402

BUDGET, SWA_EPOCHS, SWA_START = 16, 24, 13
LR_INIT, SWA_LR, WEIGHT_DECAY, MOMENTUM, BATCH = 0.1, 0.01, 3e-4, 0.9, 128
SWA_EVAL = (16, 20, 24)
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32).reshape(1, 3, 1, 1)


def read_split(data, names):
    images, labels = [], []
    for name in names:
        raw = np.fromfile(os.path.join(data, name), dtype=np.uint8).reshape(-1, 3073)
        labels.append(raw[:, 0].astype(np.int64))
        images.append(raw[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def normalise(images):
    return torch.from_numpy((images.astype(np.float32) / 255.0 - MEAN) / STD)


def augmented_batches(images, labels, rng):
    """One epoch of shuffled, cropped and flipped batches."""
    order = rng.permutation(len(images))
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for start in range(0, len(order), BATCH):
        index = order[start:start + BATCH]
        ys, xs = rng.integers(0, 9, len(index)), rng.integers(0, 9, len(index))
        flips = rng.random(len(index)) < 0.5
        batch = np.empty((len(index), 3, 32, 32), dtype=np.uint8)
        for i, (n, y, x, flip) in enumerate(zip(index, ys, xs, flips)):
            crop = padded[n, :, y:y + 32, x:x + 32]
            batch[i] = crop[:, :, ::-1] if flip else crop
        yield normalise(batch), torch.from_numpy(labels[index])


def schedule(epoch, horizon, final_ratio):
    """The original SWA code's schedule, per epoch."""
    t = epoch / horizon
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
    else:
        factor = final_ratio
    return LR_INIT * factor


def accuracy(model, test_images, test_labels):
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_images), 1000):
            x = normalise(test_images[start:start + 1000])
            correct += (model(x).argmax(1).numpy() == test_labels[start:start + 1000]).sum()
    return 100.0 * correct / len(test_images)


def train_epoch(model, optimizer, lr, train, rng):
    for group in optimizer.param_groups:
        group['lr'] = lr
    model.train()
    for x, y in augmented_batches(*train, rng):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--epochs-scale', type=float, default=1.0,
                        help='fraction of each epoch to train (below 1 only to try the script)')
    parser.add_argument('--out')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = read_split(args.data, [f'data_batch_{i}.bin' for i in range(1, 6)])
    test = read_split(args.data, ['test_batch.bin'])
    if args.epochs_scale < 1.0:
        keep = int(len(train[0]) * args.epochs_scale)
        train = (train[0][:keep], train[1][:keep])
    started = time.time()

    model = torch_ref.PreResNet(10, 20)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR_INIT, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    shared = None
    swa_model = torch.optim.swa_utils.AveragedModel(model)
    results = {'seed': args.seed}
    shared_epochs = 0
    for epoch in range(SWA_EPOCHS):
        sgd_lr = schedule(epoch, BUDGET, 0.01)
        swa_lr = schedule(epoch, SWA_START, SWA_LR / LR_INIT)
        if shared is None and sgd_lr != swa_lr:
            # From here the SGD run's learning rate differs: keep its starting point.
            shared = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                      copy.deepcopy(rng.bit_generator.state), epoch)
            shared_epochs = epoch
        train_epoch(model, optimizer, swa_lr, train, rng)
        done = epoch + 1
        if done >= SWA_START:
            swa_model.update_parameters(model)
        if done in SWA_EVAL:
            bn_rng = np.random.default_rng(10_000 + done)
            torch.optim.swa_utils.update_bn(
                (x for x, _ in augmented_batches(*train, bn_rng)), swa_model)
            results[f'swa@{done}'] = accuracy(swa_model, *test)
        print(f'swa run: epoch {done} lr {swa_lr:.4f} ({time.time() - started:.0f} s)'
              + (f', SWA accuracy {results[f"swa@{done}"]:.2f}' if f'swa@{done}' in results else ''),
              flush=True)

    model.load_state_dict(shared[0])
    optimizer.load_state_dict(shared[1])
    rng.bit_generator.state = shared[2]
    for epoch in range(shared[3], BUDGET):
        train_epoch(model, optimizer, schedule(epoch, BUDGET, 0.01), train, rng)
        print(f'sgd run: epoch {epoch + 1} ({time.time() - started:.0f} s)', flush=True)
    results['sgd@16'] = accuracy(model, *test)
    results['shared_epochs'] = shared_epochs
    results['seconds'] = round(time.time() - started)
    print(json.dumps(results))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
