"""A recipe of `cargo xtask reproduce` (SGD and SWA) in PyTorch, for a side-by-side check of accuracy.

    python xtask/torch/quick_reference.py --data DIR [--recipe FILE] [--seed N] [--threads N] [--out FILE]

DIR holds the official CIFAR-10 binary files (data_batch_1..5.bin, test_batch.bin). FILE is the
`recipe.json` that `cargo xtask reproduce` writes beside a network's seed folders
(`out/reproduce/cifar10/<model>/recipe.json`); without it, the `quick` preset's PreResNet-20 recipe. The
protocol is the recipe's, with PyTorch's own tools: the network from swa-bench/torch/torch_ref.py (the
original SWA code's networks, and the project's Shake-Shake and PyramidNet from cifar_networks.py), SGD
with momentum 0.9 and the recipe's weight decay on every parameter, random crops of the zero-padded image
(4 pixels) and horizontal flips, then the CIFAR mean/std normalisation (ImageNet's for VGG), the first
`train_limit` training and `test_limit` test images; the original code's learning-rate schedule (constant
to half the horizon, linear to the final ratio by 90%, then constant):

  - SGD: one budget, decaying to 1% of lr_init;
  - SWA: swa_epochs (1.5 budgets) with horizon swa_start and final rate swa_lr;
    torch.optim.swa_utils.AveragedModel takes the weights after every epoch from swa_start on, and the
    average is evaluated after 1, 1.25 and 1.5 budgets, its BatchNorm statistics recomputed first with
    swa_utils.update_bn over the augmented training set.

The two runs train identically until their learning rates first differ (same seed, same rate), so the
SGD run starts from the SWA run's state at that epoch, as xtask does. Prints and writes (as JSON) the
test accuracy of SGD after one budget and of SWA at the three report points.
"""
import argparse, copy, json, os, sys, time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..', 'swa-bench', 'torch'))
import torch_ref  # noqa: E402

MOMENTUM = 0.9
# The `quick` preset's recipe (xtask/src/reproduce/presets.rs), used without --recipe.
QUICK = {'architecture': 'preresnet20', 'budget': 16, 'swa_epochs': 24, 'lr_init': 0.1, 'swa_start': 11,
         'swa_lr': 0.01, 'weight_decay': 3e-4, 'batch_size': 128, 'train_limit': None, 'test_limit': None,
         'holdout': 0}
CIFAR_STATS = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])
IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
MEAN = STD = None
BATCH = QUICK['batch_size']


def report_points(budget, swa_epochs):
    """1 and 1.25 budgets and the end of the run (protocol::report_points)."""
    return sorted({budget, -(-budget * 5 // 4), swa_epochs})


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


def schedule(lr_init, epoch, horizon, final_ratio):
    """The original SWA code's schedule, per epoch."""
    t = epoch / horizon
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
    else:
        factor = final_ratio
    return lr_init * factor


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
    global MEAN, STD, BATCH
    parser = argparse.ArgumentParser()
    parser.add_argument('--data', required=True)
    parser.add_argument('--recipe', help='recipe.json written by cargo xtask reproduce')
    parser.add_argument('--seed', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--epochs-scale', type=float, default=1.0,
                        help='fraction of each epoch to train (below 1 only to try the script)')
    parser.add_argument('--out')
    args = parser.parse_args()
    recipe = dict(QUICK)
    if args.recipe:
        with open(args.recipe) as f:
            recipe.update(json.load(f))
    name = recipe['architecture']
    budget, swa_epochs, swa_start = recipe['budget'], recipe['swa_epochs'], recipe['swa_start']
    lr_init, swa_lr = recipe['lr_init'], recipe['swa_lr']
    BATCH = recipe['batch_size']
    if recipe.get('holdout'):
        sys.exit('recipes with held-out images are not reproduced here')
    mean, std = IMAGENET_STATS if name.startswith('vgg') else CIFAR_STATS
    MEAN = np.array(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    STD = np.array(std, dtype=np.float32).reshape(1, 3, 1, 1)
    swa_eval = report_points(budget, swa_epochs)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = read_split(args.data, [f'data_batch_{i}.bin' for i in range(1, 6)])
    test = read_split(args.data, ['test_batch.bin'])
    keep = recipe['train_limit'] or len(train[0])
    if args.epochs_scale < 1.0:
        keep = int(keep * args.epochs_scale)
    train = (train[0][:keep], train[1][:keep])
    if recipe['test_limit']:
        test = (test[0][:recipe['test_limit']], test[1][:recipe['test_limit']])
    print(f'{name}: {len(train[0])} train / {len(test[0])} test images, budget {budget}, SWA {swa_epochs} '
          f'epochs from {swa_start}, lr {lr_init} -> {swa_lr}, batch {BATCH}', flush=True)
    started = time.time()

    model = torch_ref.build_model(name, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_init, momentum=MOMENTUM,
                                weight_decay=recipe['weight_decay'])
    shared = None
    swa_model = torch.optim.swa_utils.AveragedModel(model)
    results = {'seed': args.seed, 'recipe': recipe}
    shared_epochs = 0
    for epoch in range(swa_epochs):
        sgd_lr = schedule(lr_init, epoch, budget, 0.01)
        run_lr = schedule(lr_init, epoch, swa_start, swa_lr / lr_init)
        if shared is None and sgd_lr != run_lr:
            # From here the SGD run's learning rate differs: keep its starting point.
            shared = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                      copy.deepcopy(rng.bit_generator.state), epoch)
            shared_epochs = epoch
        train_epoch(model, optimizer, run_lr, train, rng)
        done = epoch + 1
        if done >= swa_start:
            swa_model.update_parameters(model)
        if done in swa_eval:
            bn_rng = np.random.default_rng(10_000 + done)
            torch.optim.swa_utils.update_bn(
                (x for x, _ in augmented_batches(*train, bn_rng)), swa_model)
            results[f'swa@{done}'] = accuracy(swa_model, *test)
        print(f'swa run: epoch {done} lr {run_lr:.4f} ({time.time() - started:.0f} s)'
              + (f', SWA accuracy {results[f"swa@{done}"]:.2f}' if f'swa@{done}' in results else ''),
              flush=True)

    if shared is None:
        shared = (model.state_dict(), optimizer.state_dict(), rng.bit_generator.state, budget)
    model.load_state_dict(shared[0])
    optimizer.load_state_dict(shared[1])
    rng.bit_generator.state = shared[2]
    for epoch in range(shared[3], budget):
        train_epoch(model, optimizer, schedule(lr_init, epoch, budget, 0.01), train, rng)
        print(f'sgd run: epoch {epoch + 1} ({time.time() - started:.0f} s)', flush=True)
    results[f'sgd@{budget}'] = accuracy(model, *test)
    results['shared_epochs'] = shared_epochs
    results['seconds'] = round(time.time() - started)
    print(json.dumps(results))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
