"""Fixtures of the ImageNet networks' golden tests, from torchvision's own classes.

Called by make_golden.py (family `imagenet`). Writes:
  golden_resnet14-w8.safetensors, golden_resnet14-w8_io.safetensors, golden_resnet14-w8_grads.safetensors
      as make_golden.py's `golden` family, on two 64×64 images: a ResNet of torchvision's `Bottleneck`
      blocks, one per stage, with a stem and first stage 8 wide instead of 64 (torchvision's ResNet class
      fixes the widths, so the same layers and names are assembled here at a size a fixture can hold),
      BatchNorm randomised, then labels, the cross-entropy of a train-mode pass and every parameter's
      gradient ("grad.<key>");
  golden_resnet14-w8.pth
      the same state_dict saved by torch.save, as users hold torchvision checkpoints;
  golden_nested_checkpoint.pth
      a training checkpoint as the original SWA code saves one from nn.DataParallel: {'epoch': 3,
      'state_dict': {'module.fc.weight': …, 'module.fc.bias': …, 'module.bn.num_batches_tracked': …},
      'optimizer': …} with a 2×3 linear layer's values 0..5 and 0.5, 1.5 and a counter of 7;
  golden_densenet29-k8.safetensors, golden_densenet29-k8_io.safetensors,
  golden_densenet29-k8_grads.safetensors
      the same, on two 64×64 images, for torchvision's own DenseNet class reduced to three dense layers
      a block, growth 8, a 16-wide stem and bn_size 4 (odd channel counts after the second transition,
      so the halving rounds down), BatchNorm randomised; its gradients file also holds, for every
      parameter, "f32_error.<key>": how far PyTorch's own float32 gradient is from the float64 one
      (largest difference over the largest float64 magnitude), which is large where the gradient is
      mostly cancelled (the stem's BatchNorm, whose output reaches the loss only through
      training-mode BatchNorms);
  golden_densenet29-k8_legacy.pth
      that network's state_dict as torchvision's published DenseNet weights hold theirs, which predate
      both the current names and the BatchNorm batch counter: `denselayer<i>.norm.1.weight` for
      `denselayer<i>.norm1.weight` (and so on for norm, conv, 1 and 2), no `num_batches_tracked`;
  imagenet_shapes.json
      for torchvision.models.resnet50, resnet152 and densenet161 (1000 classes, no weights downloaded):
      every state_dict key with its shape and dtype, and the parameter count.
"""
import copy, json, os

import torch
from torch import nn
from torchvision.models import densenet161, resnet50, resnet152
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import Bottleneck, conv1x1
from safetensors.torch import load_file, save_file

BATCH = 2
SIZE = 64
SMALL = ('resnet14-w8', 10, 8)   # name, classes, width
SMALL_DENSENET = ('densenet29-k8', 10, dict(growth_rate=8, block_config=(3, 3, 3, 3), num_init_features=16,
                                            bn_size=4))


class SmallResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc) with one
    torchvision Bottleneck a stage and a chosen width, initialised as torchvision initialises ResNets."""

    def __init__(self, width, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for stage in range(4):
            planes = width << stage
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(conv1x1(inplanes, planes * Bottleneck.expansion, stride),
                                           nn.BatchNorm2d(planes * Bottleneck.expansion))
            block = Bottleneck(inplanes, planes, stride, downsample)
            setattr(self, f'layer{stage + 1}', nn.Sequential(block))
            inplanes = planes * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def add_float32_errors(model, name, x, out):
    """Adds "f32_error.<key>" to `golden_<name>_grads.safetensors`: the relative distance between the
    stored float32 gradient of each parameter and the same pass's gradient in float64."""
    path = os.path.join(out, f'golden_{name}_grads.safetensors')
    grads = load_file(path)
    exact = copy.deepcopy(model).double()
    exact.zero_grad()
    loss = torch.nn.functional.cross_entropy(exact(x.double()), grads['labels'])
    loss.backward()
    for k, p in exact.named_parameters():
        want = p.grad.detach()
        error = (grads['grad.' + k].double() - want).abs().max() / want.abs().max()
        grads['f32_error.' + k] = error.float().reshape(1)
    save_file(grads, path)
    worst = max(grads, key=lambda k: grads[k].item() if k.startswith('f32_error.') else -1)
    print(f'{name}: float32 gradients within {grads[worst].item():.2e} of float64 ({worst})')


def legacy_densenet_state_dict(model):
    """The state_dict under the names torchvision's published DenseNet weights use, without counters."""
    legacy = {}
    for k, v in model.state_dict().items():
        if k.endswith('num_batches_tracked'):
            continue
        parts = k.split('.')
        for i, part in enumerate(parts[:-2]):
            if part.startswith('denselayer') and parts[i + 1][:-1] in ('norm', 'relu', 'conv'):
                parts[i + 1:i + 2] = [parts[i + 1][:-1], parts[i + 1][-1]]
                break
        legacy['.'.join(parts)] = v.detach().clone()
    return legacy


def params(model):
    return sum(p.numel() for p in model.parameters())


def write(out, randomise_batch_norm, write_forward_fixtures, write_gradient_fixture):
    name, classes, width = SMALL
    torch.manual_seed(9000)
    model = SmallResNet(width, classes)
    gen = torch.Generator().manual_seed(9100)
    randomise_batch_norm(model, gen)
    torch.save(model.state_dict(), os.path.join(out, f'golden_{name}.pth'))
    x = write_forward_fixtures(model, name, gen, out, BATCH, SIZE)
    write_gradient_fixture(model, name, x, classes, gen, out)
    nested = {
        'epoch': 3,
        'state_dict': {
            'module.fc.weight': torch.arange(6, dtype=torch.float32).reshape(2, 3),
            'module.fc.bias': torch.tensor([0.5, 1.5]),
            'module.bn.num_batches_tracked': torch.tensor(7),
        },
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.1, 'momentum': 0.9}]},
    }
    torch.save(nested, os.path.join(out, 'golden_nested_checkpoint.pth'))
    name, classes, shape = SMALL_DENSENET
    torch.manual_seed(9200)
    model = DenseNet(num_classes=classes, **shape)
    gen = torch.Generator().manual_seed(9300)
    randomise_batch_norm(model, gen)
    torch.save(legacy_densenet_state_dict(model), os.path.join(out, f'golden_{name}_legacy.pth'))
    x = write_forward_fixtures(model, name, gen, out, BATCH, SIZE)
    write_gradient_fixture(model, name, x, classes, gen, out)
    add_float32_errors(model, name, x, out)
    table = {}
    for key, build in [('resnet50', resnet50), ('resnet152', resnet152), ('densenet161', densenet161)]:
        net = build(weights=None)
        table[key] = {
            'parameters': params(net),
            'state_dict': [[k, list(v.shape), str(v.dtype).replace('torch.', '')]
                           for k, v in net.state_dict().items()],
        }
        print(f'{key}: {params(net)} parameters')
    with open(os.path.join(out, 'imagenet_shapes.json'), 'w') as f:
        json.dump(table, f, separators=(',', ':'))
