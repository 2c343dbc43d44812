"""ImageClassifier: loss on logits, one metric per stage, predictions, optimizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_cli.classifier import ImageClassifier
from cifar_cli.nets import TutorialCNN


def make(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(TutorialCNN(num_classes=3), class_names=["a", "b", "c"], **kwargs)


def test_one_metric_object_per_stage() -> None:
    model = make()
    metrics = [model.train_acc, model.val_acc, model.test_acc, model.train_loss, model.val_loss, model.test_loss]
    assert len({id(m) for m in metrics}) == 6


def test_training_loss_is_cross_entropy_on_logits() -> None:
    model = make(label_smoothing=0.1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    loss = model.training_step((images, labels), 0)
    expected = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    assert model.train_acc.update_count == 1 and model.val_acc.update_count == 0
    assert torch.allclose(model.train_loss.compute(), expected) and model.val_loss.update_count == 0


def test_predict_step_gives_class_confidence_and_label() -> None:
    model = make().eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, -1])
    out = model.predict_step((images, labels), 0)
    probabilities = model(images).softmax(1)
    assert torch.equal(out["predicted"], probabilities.argmax(1))
    assert torch.allclose(out["confidence"], probabilities.max(1).values)
    assert torch.equal(out["label"], labels)


def test_default_optimizer_is_adam_with_learning_rate() -> None:
    optimizer = make(learning_rate=1e-3).configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3


def test_any_network_can_be_injected() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    model = ImageClassifier(net, class_names=["x", "y"])
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 2)
