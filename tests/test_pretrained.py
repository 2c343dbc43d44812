"""Networks by name (torchvision, timm), weights from local files, transfer with --model.init_from, and the
fine-tuning controls (backbone learning-rate factor, BackboneFinetuning, the weights' normalisation)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_image_folder
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from PIL import Image
from test_cli import fails

from cifar_cli.classifier import ImageClassifier
from cifar_cli.cli import main
from cifar_cli.errors import UsageError
from cifar_cli.nets import TutorialCNN
from cifar_cli.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TimmNet,
    TorchvisionNet,
    source_config,
    weights_from_checkpoint,
)

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary"]
QUIET += ["false", "--trainer.max_epochs", "1"]


def folder_args(root: Path, *more: str) -> list[str]:
    return ["--data", "ImageFolderDataModule", "--data.root", str(root), "--data.val_size", "30", *QUIET, *more]


def only_checkpoint() -> Path:
    (path,) = [p for p in Path().glob("**/*.ckpt") if not p.name.startswith("last") and p.parent.name != "kept"]
    return path


@pytest.mark.parametrize(
    ("name", "head_path", "size"),
    [
        ("resnet18", "fc", 32),
        ("mobilenet_v3_small", "classifier.3", 32),
        ("squeezenet1_1", "classifier.1", 64),  # its head is a 1x1 convolution
        ("googlenet", "fc", 64),  # its auxiliary heads are dropped
        ("vit_b_32", "heads.head", 224),  # its class token is a parameter of the root module
    ],
)
def test_torchvision_networks_get_a_new_head_and_a_backbone_of_everything_else(name, head_path, size) -> None:
    net = TorchvisionNet(num_classes=5, image_shape=(3, size, size), name=name).eval()
    assert net.head_path == head_path
    assert net(torch.randn(2, 3, size, size)).shape == (2, 5)
    backbone = {id(p) for p in net.backbone.parameters()}
    head = {id(p) for p in net.head.parameters()}
    assert not backbone & head and backbone | head == {id(p) for p in net.parameters()}
    assert net.input_mean is None  # random weights: the data's own statistics normalise


def test_unknown_network_and_weights_names_fail_in_one_line(capsys) -> None:
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.name", "resnet81")
    assert "resnet81: no torchvision classification network; did you mean resnet18" in err
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights", "IMAGENET9K")
    assert err.endswith("--model.net.weights IMAGENET9K: resnet18 has the weights DEFAULT, IMAGENET1K_V1")  # once each


def test_a_network_of_the_other_library_says_which_to_use(capsys) -> None:
    # Close torchvision names alone ("80 are known") sent the user looking for a spelling that was right.
    pytest.importorskip("timm")
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.name", "deit_tiny_patch16_224")
    assert err.endswith("no torchvision classification network; it is timm's: --model.net TimmNet --model.net.name "
                        "deit_tiny_patch16_224")  # fmt: skip
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.name", "efficientnet_b0.ra_in1k")
    assert err.endswith("it is timm's: --model.net TimmNet --model.net.name efficientnet_b0.ra_in1k, or "
                        "torchvision's efficientnet_b0 with --model.net.weights DEFAULT")  # fmt: skip
    err = fails(capsys, "fit", "--model.net", "TimmNet", "--model.net.name", "vit_b_16")
    assert err.endswith("no timm network; it is torchvision's: --model.net TorchvisionNet --model.net.name vit_b_16")


def test_weights_offline_name_the_file_and_the_folder(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights", "DEFAULT")
    assert "put resnet18-f37072fd.pth from https://download.pytorch.org/models/resnet18-f37072fd.pth in " in err
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}/, or pass --model.net.weights_path FILE" in err


def test_weights_without_network_fail_in_one_line_without_a_request(capsys, monkeypatch, tmp_path: Path) -> None:
    # torch's download printed `Downloading: "<url>" to <file>` on stdout before it failed, and made the folder.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def no_network(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.net", "TorchvisionNet", "--model.net.weights", "DEFAULT"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "cifar-cli: error: cannot download the resnet18 weights ResNet18_Weights.IMAGENET1K_V1 (download.pytorch.org "
        "does not resolve: no network): put resnet18-f37072fd.pth from "
        f"https://download.pytorch.org/models/resnet18-f37072fd.pth in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/, "
        "or pass --model.net.weights_path FILE\n"
    )
    assert not (tmp_path / "torch").exists()


@pytest.mark.parametrize("damage", ["truncated", "not_weights"])
def test_a_damaged_weights_file_in_the_cache_fails_in_one_line(capsys, monkeypatch, tmp_path: Path, damage) -> None:
    # The file put there by hand, as the offline message says, cut short or of another kind: it was a traceback
    # from torch.load ("PytorchStreamReader failed reading zip archive").
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    cached.write_bytes(cached.read_bytes()[:100_000] if damage == "truncated" else b"\xff\xd8\xff\xe0 a JPEG")
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights", "DEFAULT")
    weights = "the resnet18 weights ResNet18_Weights.IMAGENET1K_V1"
    assert err.startswith(f"cifar-cli: error: {weights} in {cached} do not load (")
    assert err.endswith(
        "): remove the file to download it again, or replace it with resnet18-f37072fd.pth from "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    )


def test_a_checkpoint_of_named_weights_tests_offline(image_folder, monkeypatch) -> None:
    """Trained from `--model.net.weights DEFAULT`, the checkpoint is tested where the weights cannot be downloaded:
    its own weights replace them, and the weights' normalisation is kept."""
    with monkeypatch.context() as online:  # as if downloaded
        online.setattr("cifar_cli.pretrained.download_weights", lambda *a: torchvision.models.resnet18().state_dict())
        main(["fit", *folder_args(image_folder, "--model.net", "TorchvisionNet", "--model.net.weights", "DEFAULT",
                                  "--trainer.limit_train_batches", "1")])  # fmt: skip

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    main(["test", "--ckpt_path", str(only_checkpoint()), "--data.test_size", "10", *QUIET])
    saved = torch.load(only_checkpoint(), weights_only=True)["ImageFolderDataModule"]
    assert torch.allclose(saved["std"], torch.tensor(IMAGENET_STD) * 255)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_the_backbone_and_normalises_as_the_weights_expect(image_folder, suffix) -> None:
    source = torchvision.models.resnet18()
    path = Path(f"resnet18{suffix}")
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    net = TorchvisionNet(num_classes=3, name="resnet18", weights_path=str(path))
    assert torch.equal(net.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert net.head.out_features == 3 and not torch.equal(net.head.weight[:3], source.fc.weight[:3])
    assert (net.input_mean, net.input_std) == (IMAGENET_MEAN, IMAGENET_STD)

    if suffix == ".safetensors":
        return  # the command line once is enough
    args = ["--model.net", "TorchvisionNet", "--model.net.weights_path", str(path)]
    args += ["--trainer.limit_train_batches", "1"]
    main(["fit", *folder_args(image_folder, *args)])
    checkpoint = torch.load(only_checkpoint(), weights_only=True)
    assert checkpoint["state_dict"]["net.model.fc.weight"].shape == (3, 512)
    main(["test", "--ckpt_path", str(only_checkpoint()), *QUIET])  # rebuilt from the checkpoint alone
    # On a machine without the weights file and the training images: the checkpoint alone predicts new images,
    # normalised as the weights expect.
    ckpt = only_checkpoint().rename("moved.ckpt")
    path.unlink()
    photos = Path("photos")
    shutil.copytree(image_folder / "test" / "dog", photos)
    shutil.rmtree(image_folder)
    main(["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(photos), *QUIET])
    with open("predictions.csv") as file:
        assert len(list(csv.DictReader(file))) == 10
    assert torch.allclose(torch.load(ckpt, weights_only=True)["ImageFolderDataModule"]["mean"],
                          torch.tensor(IMAGENET_MEAN) * 255)  # fmt: skip


def test_weights_path_of_a_cifar_cli_checkpoint_points_to_init_from(image_folder, capsys) -> None:
    """Every tensor of a cifar-cli checkpoint was said not to fit (`242 problems: bn1.bias is missing; ...`)."""
    main(["fit", *folder_args(image_folder, "--trainer.limit_train_batches", "1")])
    ckpt = str(only_checkpoint())
    capsys.readouterr()
    for net in ("TorchvisionNet", "TimmNet"):
        if net == "TimmNet":
            pytest.importorskip("timm")
        err = fails(capsys, "fit", *folder_args(image_folder, "--model.net", net, "--model.net.weights_path", ckpt))
        assert err.endswith(
            f"--model.net.weights_path {ckpt} is a cifar-cli checkpoint, not the network's state dict: start from "
            f"its weights with --model.init_from {ckpt}"
        )


def test_vit_weights_of_another_image_size_load(monkeypatch) -> None:
    """torchvision builds a ViT for the image size of its weights (the SWAG ones take 384 px and more): built at 224,
    `vit_b_16` refused IMAGENET1K_SWAG_E2E_V1, and `vit_h_14` its DEFAULT, as weights that do not fit."""
    import cifar_cli.pretrained as pretrained

    source = torchvision.models.vit_b_16(image_size=384).state_dict()  # 577 position embeddings, not 197
    monkeypatch.setattr(pretrained, "download_weights", lambda name, weights: source)
    monkeypatch.setattr(pretrained, "load_weights_file", lambda path, flag: source)
    for given in ({"weights": "IMAGENET1K_SWAG_E2E_V1"}, {"weights_path": "vit.pth"}):
        net = TorchvisionNet(num_classes=3, image_shape=(3, 384, 384), name="vit_b_16", **given)
        assert torch.equal(net.model.encoder.pos_embedding, source["encoder.pos_embedding"])
        assert net(torch.zeros(1, 3, 384, 384)).shape == (1, 3)
    with pretrained.weights_from_checkpoint():  # the file is not read: the size is the run's
        net = TorchvisionNet(num_classes=3, image_shape=(3, 384, 384), name="vit_b_16", weights_path="gone.pth")
        assert net.model.encoder.pos_embedding.shape == source["encoder.pos_embedding"].shape


def test_pretrained_statistics_replace_the_datas(image_folder) -> None:
    from cifar_cli.data import ImageFolderDataModule

    data = ImageFolderDataModule(str(image_folder), val_size=30)
    data.prepare("fit")
    data.setup("fit")
    assert not torch.allclose(data.mean, torch.tensor(IMAGENET_MEAN) * 255)
    path = Path("r18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model = ImageClassifier(TorchvisionNet(3, weights_path=str(path)), data.class_names)
    model.trainer = type("Stub", (), {"datamodule": data})()  # what setup reads of the trainer
    model.setup("fit")
    assert torch.allclose(data.mean, torch.tensor(IMAGENET_MEAN) * 255)
    assert torch.allclose(data.std, torch.tensor(IMAGENET_STD) * 255)


def test_weights_path_of_another_architecture_fails_in_one_line(capsys) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), "r34.pth")
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "r34.pth")
    assert "--model.net.weights_path: the weights do not fit this architecture (" in err and "unexpected" in err
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "nothing.pth")
    assert err.endswith("--model.net.weights_path nothing.pth: no such file")
    Path("weights").mkdir()
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "weights")
    assert err.endswith("--model.net.weights_path weights is a folder: give the weights file in it (.pth, .pt or "
                        ".safetensors)")  # fmt: skip


def test_weights_path_that_is_no_state_dict_says_what_it_holds(capsys) -> None:
    # torch's own message advised loading the file without weights_only, which cifar-cli never does.
    Path("photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "photo.jpg")
    assert err.endswith("--model.net.weights_path photo.jpg is not a weights file (not a file torch.save wrote)")
    torch.save(torchvision.models.resnet18(), "whole.pth")  # the module pickled, not its state_dict
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "whole.pth")
    assert err.endswith(
        "--model.net.weights_path whole.pth is not a weights file (it holds a torchvision.models.resnet.ResNet, "
        "which weights-only loading refuses: save the network's state_dict() instead)"
    )
    Path("cut.pth").write_bytes(Path("whole.pth").read_bytes()[:5000])
    err = fails(capsys, "fit", "--model.net", "TorchvisionNet", "--model.net.weights_path", "cut.pth")
    assert "--model.net.weights_path cut.pth is not a weights file (the file is truncated or damaged: " in err


def test_backbone_lr_factor_puts_the_backbone_in_its_own_groups() -> None:
    model = ImageClassifier(TorchvisionNet(3), ["a", "b", "c"], learning_rate=0.1, backbone_lr_factor=0.01)
    model.trainer = None
    optimizer = model.configure_optimizers()
    groups = [(group["lr"], sum(p.numel() for p in group["params"])) for group in optimizer.param_groups]
    head, backbone = model.net.head, model.net.backbone
    norms = sum(p.numel() for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    others = sum(p.numel() for p in backbone.parameters()) - norms
    assert groups == [(0.1, sum(p.numel() for p in head.parameters())), (0.001, others), (0.001, norms)]


def test_a_second_head_is_no_part_of_the_backbone() -> None:
    """A distilled DeiT averages the logits of two new heads, `head` and `head_dist`: the second was counted in the
    backbone, so BackboneFinetuning froze it at its random start and backbone_lr_factor slowed it down."""
    pytest.importorskip("timm")
    net = TimmNet(num_classes=3, image_shape=(3, 224, 224), name="deit_tiny_distilled_patch16_224")
    backbone = {id(p) for p in net.backbone.parameters()}
    heads = {id(p) for head in (net.model.head, net.model.head_dist) for p in head.parameters()}
    assert not backbone & heads and backbone | heads == {id(p) for p in net.parameters()}
    BackboneFinetuning().freeze_before_training(ImageClassifier(net, ["a", "b", "c"]))
    assert all(p.requires_grad for p in net.model.head_dist.parameters())
    assert not any(p.requires_grad for p in net.model.patch_embed.parameters())
    model = ImageClassifier(net, ["a", "b", "c"], learning_rate=0.1, backbone_lr_factor=0.01)
    model.trainer = None
    optimizer = model.configure_optimizers()
    assert list(optimizer.param_groups[0]["params"]) == [
        *net.model.head.parameters(),
        *net.model.head_dist.parameters(),
    ]
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_backbone_finetuning_freezes_the_backbone_until_its_epoch(image_folder) -> None:
    torch.save(torchvision.models.resnet18().state_dict(), "r18.pth")
    source = torch.load("r18.pth", weights_only=True)
    base = ["--model.net", "TorchvisionNet", "--model.net.weights_path", "r18.pth"]
    base += ["--trainer.callbacks+=BackboneFinetuning", "--trainer.callbacks.unfreeze_backbone_at_epoch", "1"]
    # Both epochs' weights kept: every epoch checkpointed.
    base += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k", "-1"]
    base += ["--trainer.callbacks.dirpath", "epochs", "--trainer.limit_train_batches", "2"]
    main(["fit", *folder_args(image_folder, *base, "--trainer.max_epochs", "2")])
    frozen = torch.load("epochs/epoch=0-step=2.ckpt", weights_only=True)
    assert torch.equal(frozen["state_dict"]["net.model.conv1.weight"], source["conv1.weight"])
    assert not torch.equal(frozen["state_dict"]["net.model.fc.weight"][:3], source["fc.weight"][:3])
    unfrozen = torch.load("epochs/epoch=1-step=4.ckpt", weights_only=True)
    assert not torch.equal(unfrozen["state_dict"]["net.model.conv1.weight"], source["conv1.weight"])
    assert len(unfrozen["optimizer_states"][0]["param_groups"]) == 3  # head, its norms (none), backbone added


def test_backbone_finetuning_on_a_network_without_a_backbone_says_so(image_folder, capsys) -> None:
    args = ["--trainer.callbacks+=BackboneFinetuning", "--trainer.limit_train_batches", "1"]
    with pytest.raises(SystemExit):
        main(["fit", *folder_args(image_folder, *args)])
    assert (
        "BackboneFinetuning needs a network with a backbone, such as TorchvisionNet or TimmNet; TutorialCNN has none"
        in capsys.readouterr().err
    )


def test_init_from_loads_matching_weights_with_a_new_head_for_new_classes(image_folder, tmp_path, capsys) -> None:
    main(["fit", *folder_args(image_folder, "--trainer.limit_train_batches", "2")])
    pretrained = only_checkpoint()
    saved = torch.load(pretrained, weights_only=True)["state_dict"]
    capsys.readouterr()

    model = ImageClassifier(TutorialCNN(2), ["ant", "bee"], init_from=str(pretrained))
    err = capsys.readouterr().err
    assert f"--model.init_from {pretrained}: loaded 12 of 14 network tensors; new: fc3.bias, fc3.weight" in err
    assert torch.equal(model.net.conv1.weight, saved["net.conv1.weight"])
    assert torch.equal(model.net.fc2.weight, saved["net.fc2.weight"])

    # The same classes: the head comes too.
    same = ImageClassifier(TutorialCNN(3), ["cat", "dog", "frog"], init_from=str(pretrained))
    assert torch.equal(same.net.fc3.weight, saved["net.fc3.weight"])
    # Other classes, same count: the head is new.
    other = ImageClassifier(TutorialCNN(3), ["ant", "bee", "cow"], init_from=str(pretrained))
    assert not torch.equal(other.net.fc3.weight, saved["net.fc3.weight"])


def test_init_from_normalises_the_images_as_the_run_it_comes_from(image_folder, tmp_path, capsys) -> None:
    """The weights init_from loads were trained on images normalised by their run's statistics (or by a pretrained
    network's): the new fit normalised by its own data's, so the loaded network saw other inputs (an ImageNet
    ResNet, data-normalised in its second stage)."""
    (tmp_path / "kept").mkdir()

    def kept(name: str) -> Path:
        return only_checkpoint().rename(tmp_path / "kept" / name)  # out of the next fit's checkpoint folder

    main(["fit", *folder_args(image_folder, "--trainer.limit_train_batches", "2")])
    first = kept("first.ckpt")
    darker = tmp_path / "darker"
    write_image_folder(darker / "train", {"ant": 30, "bee": 30}, seed=5)
    for path in (darker / "train").glob("*/*.jpg"):
        Image.open(path).point(lambda v: v // 3).save(path, quality=95)

    def normalization(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
        state = torch.load(checkpoint, weights_only=True)["ImageFolderDataModule"]
        return state["mean"], state["std"]

    main(["fit", *folder_args(darker, "--trainer.limit_train_batches", "2")])
    own = kept("own.ckpt")
    capsys.readouterr()
    main(["fit", *folder_args(darker, "--model.init_from", str(first), "--trainer.limit_train_batches", "2")])
    assert "loaded 12 of 14 network tensors; new: fc3.bias, fc3.weight; images normalised as its run's were" in (
        capsys.readouterr().err
    )
    mean, std = normalization(only_checkpoint())
    assert torch.equal(mean, normalization(first)[0]) and torch.equal(std, normalization(first)[1])
    assert (normalization(own)[0] < mean * 0.6).all()  # the darker images' own statistics, which it used before


def test_init_from_through_the_cli_and_test_without_the_file(image_folder, tmp_path, capsys) -> None:
    main(["fit", *folder_args(image_folder, "--trainer.limit_train_batches", "2")])
    first = only_checkpoint()
    moved = first.rename(tmp_path / "pretrained.ckpt")
    main(["fit", *folder_args(image_folder, "--model.init_from", str(moved), "--trainer.limit_train_batches", "2")])
    assert f"--model.init_from {moved}: loaded 14 of 14 network tensors" in capsys.readouterr().err
    moved.unlink()  # the fine-tuned checkpoint stands alone
    main(["test", "--ckpt_path", str(only_checkpoint()), *QUIET])


def test_init_from_a_checkpoint_of_another_network_fails_in_one_line(image_folder, capsys) -> None:
    main(["fit", *folder_args(image_folder, "--trainer.limit_train_batches", "1")])
    first = str(only_checkpoint())
    capsys.readouterr()
    args = ["--model.net", "TorchvisionNet", "--model.init_from", first]
    err = fails(capsys, "fit", *folder_args(image_folder, *args))
    assert f"--model.init_from {first}: none of its network weights fits this network (its net is " in err
    err = fails(capsys, "fit", *folder_args(image_folder, "--model.init_from", "missing.ckpt"))
    assert err.endswith("--model.init_from missing.ckpt: no such file; pass a .ckpt file written by `cifar-cli fit`")


def test_timm_networks_by_name_with_local_weights(image_folder) -> None:
    timm = pytest.importorskip("timm")
    source = timm.create_model("test_resnet")
    torch.save(source.state_dict(), "test_resnet.pth")
    net = TimmNet(num_classes=3, image_shape=(3, 32, 32), name="test_resnet", weights_path="test_resnet.pth")
    assert net.head_path == "fc" and net.head.out_features == 3
    own = net.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if not k.startswith("fc."))
    assert net.input_mean == tuple(source.pretrained_cfg["mean"])
    args = ["--model.net", "TimmNet", "--model.net.name", "test_resnet", "--model.net.weights_path", "test_resnet.pth",
            "--trainer.limit_train_batches", "1"]  # fmt: skip
    main(["fit", *folder_args(image_folder, *args)])
    assert only_checkpoint().is_file()
    Path("test_resnet.pth").unlink()  # the weights come from the checkpoint: the file is not read
    main(["test", "--ckpt_path", str(only_checkpoint()), *QUIET])


def test_timm_network_from_a_folder_timm_saved(image_folder) -> None:
    """timm's own source prefixes (`local-dir:`, `hf-hub:`) name no registry entry: TimmNet refused them as "no timm
    network". A folder saved by timm (config.json and the weights) builds its network offline, with a new head."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    source = timm.create_model("test_resnet")
    save_for_hf(source, "saved")
    net = TimmNet(num_classes=3, image_shape=(3, 32, 32), name="local-dir:saved", pretrained=True)
    own = net.model.state_dict()
    assert net.head.out_features == 3
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items() if not k.startswith("fc."))
    args = ["--model.net", "TimmNet", "--model.net.name", "local-dir:saved", "--model.net.pretrained", "true",
            "--trainer.limit_train_batches", "1"]  # fmt: skip
    main(["fit", *folder_args(image_folder, *args)])
    assert only_checkpoint().is_file()


def test_timm_folder_checkpoint_tests_from_another_folder_and_a_missing_folder_says_so(
    image_folder, tmp_path, monkeypatch, capsys
) -> None:
    """A relative `local-dir:` folder is found from where `fit` ran, as the data is: `test --ckpt_path` from another
    folder failed. A folder that is not there (or holds no config.json) was said to be a download to retry online."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    save_for_hf(timm.create_model("test_resnet"), "saved")
    args = ["--model.net", "TimmNet", "--model.net.name", "local-dir:saved", "--model.net.pretrained", "true",
            "--trainer.limit_train_batches", "1"]  # fmt: skip
    main(["fit", *folder_args(image_folder, *args)])
    checkpoint = only_checkpoint().resolve()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["test", "--ckpt_path", str(checkpoint), *QUIET])
    assert "test_acc" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "saved")
    # A checkpoint of an earlier version, without the architecture (see the next test), still needs the folder.
    old = torch.load(checkpoint, weights_only=True)
    del old["timm_config"]
    torch.save(old, checkpoint)
    err = fails(capsys, "test", "--ckpt_path", str(checkpoint), *QUIET)
    assert err.endswith(
        "--model.net.name local-dir:saved: no such folder saved; give the folder timm saved with save_for_hf, whose "
        "config.json names the architecture (the checkpoint holds the weights, not the architecture)"
    )
    Path("no-config").mkdir()
    err = fails(
        capsys, "fit", *folder_args(image_folder, "--model.net", "TimmNet", "--model.net.name", "local-dir:no-config")
    )
    assert "--model.net.name local-dir:no-config: no-config has no config.json; give the folder timm saved" in err


def test_a_timm_checkpoint_carries_the_architecture_of_its_folder_or_hub_repository(image_folder, capsys) -> None:
    """timm builds a `local-dir:` or `hf-hub:` network from a config.json, which the checkpoint lacked: without
    the folder (or the Hub and its cache) the checkpoint alone could not test or predict, and with the folder's
    config.json changed since, it was refused as another network's weights. The checkpoint keeps a copy."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    save_for_hf(timm.create_model("test_resnet"), "saved")
    args = ["--model.net", "TimmNet", "--model.net.name", "local-dir:saved", "--model.net.pretrained", "true",
            "--trainer.limit_train_batches", "1"]  # fmt: skip
    main(["fit", *folder_args(image_folder, *args)])
    checkpoint = only_checkpoint()
    saved = torch.load(checkpoint, weights_only=True)["timm_config"]
    assert saved == {"name": "local-dir:saved", "config": json.loads(Path("saved/config.json").read_text())}
    assert saved["config"]["architecture"] == "test_resnet"

    def predictions() -> list[dict[str, str]]:
        main(["predict", "--ckpt_path", str(checkpoint), "--data.predict_root", str(image_folder / "test"), *QUIET])
        with open("predictions.csv") as file:
            return list(csv.DictReader(file))

    before = predictions()
    shutil.rmtree("saved")
    save_for_hf(timm.create_model("test_vit"), "saved")  # another network in the folder now
    assert predictions() == before
    shutil.rmtree("saved")
    assert predictions() == before
    main(["test", "--ckpt_path", str(checkpoint), *QUIET])
    assert "test_acc" in capsys.readouterr().out
    # A resumed run keeps the copy in its checkpoints.
    main(["fit", "--ckpt_path", str(checkpoint), *QUIET, "--trainer.max_epochs", "2"])
    last = max(Path().glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)  # (last-v1.ckpt, resumed from best)
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 1 and resumed["timm_config"] == saved


def test_the_config_of_an_hf_hub_network_is_read_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    (tmp_path / "config.json").write_text('{"architecture": "resnet18"}')
    asked = []

    def hf_hub_download(repo, filename, revision=None):
        asked.append((repo, filename, revision, constants.HF_HUB_OFFLINE))
        return str(tmp_path / "config.json")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    assert source_config("hf-hub:timm/resnet18.a1_in1k@main") == {"architecture": "resnet18"}
    assert source_config("hf-hub:timm/resnet18.a1_in1k") == {"architecture": "resnet18"}
    assert asked == [("timm/resnet18.a1_in1k", "config.json", rev, True) for rev in ("main", None)]
    assert source_config("resnet18.a1_in1k") is None


def test_timm_weights_path_of_another_network_fails_in_one_line(image_folder, capsys) -> None:
    timm = pytest.importorskip("timm")
    # timm loaded a file with any other head than its pretrained one with strict=False: these trained from random
    # weights without a word.
    torch.save(timm.create_model("test_vit").state_dict(), "vit.pth")
    torch.save({"stem.weight": torch.zeros(3)}, "other.pth")
    for file in ("vit.pth", "other.pth"):
        args = ["--model.net", "TimmNet", "--model.net.name", "test_resnet", "--model.net.weights_path", file]
        err = fails(capsys, "fit", *folder_args(image_folder, *args))
        assert "--model.net.weights_path: the weights do not fit this architecture (" in err
    assert not list(Path().glob("**/*.ckpt"))


def test_timm_weights_path_timm_converts_still_loads(image_folder) -> None:
    # A ViT's file of another image size: timm resamples its position embeddings, as it did loading the file itself.
    timm = pytest.importorskip("timm")
    source = timm.create_model("test_vit", img_size=224)
    torch.save(source.state_dict(), "vit224.pth")
    net = TimmNet(num_classes=3, image_shape=(3, 32, 32), name="test_vit", weights_path="vit224.pth")
    own = net.model.state_dict()
    assert own["pos_embed"].shape != source.pos_embed.shape
    assert torch.equal(own["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("where", ["cache", "hub", "nowhere"])
def test_timm_weights_from_the_cache_without_a_request_and_no_retries_offline(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Pretrained timm weights: first from huggingface_hub's cache in its offline mode (no request, so no wait on a
    machine without network); not there, downloaded only where the Hub's name resolves: elsewhere the error comes
    at once instead of after huggingface_hub's retries (about 50 s for a network's two files)."""
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as without HF_HUB_OFFLINE in the environment
    real_create = timm.create_model
    offline_modes = []

    def create_model(name, pretrained=False, **kwargs):
        offline_modes.append(constants.HF_HUB_OFFLINE)
        if pretrained and not (where == "cache" or where == "hub" and not constants.HF_HUB_OFFLINE):
            raise LocalEntryNotFoundError("not in the local cache")
        return real_create("test_resnet", **kwargs)

    def resolve(host, *args):
        if where == "nowhere":
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    if where == "nowhere":
        # The cache huggingface_hub reads (from HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME), not ~/.cache/huggingface/hub
        monkeypatch.setattr(constants, "HF_HUB_CACHE", "/data/hf-cache")
        err = fails(capsys, "fit", "--model.net", "TimmNet", "--model.net.pretrained", "true")
        assert err.endswith(
            "cannot download the timm weights of resnet18 (huggingface.co does not resolve: no network): run once "
            "online to fill /data/hf-cache, or pass --model.net.weights_path FILE"
        )
    else:
        TimmNet(num_classes=3, image_shape=(3, 32, 32), pretrained=True)
    assert offline_modes == {"cache": [True], "hub": [True, False], "nowhere": [True]}[where]
    assert constants.HF_HUB_OFFLINE is False  # as it was


def test_an_hf_hub_network_of_a_checkpoint_off_the_hub_names_its_config(monkeypatch) -> None:
    """`test --ckpt_path` of a TimmNet `hf-hub:` run on a machine without the Hub or its cache: the checkpoint's
    weights replace the network's, but timm reads its architecture from the repository's config.json. The error
    said to pass --model.net.weights_path, which a checkpoint ignores."""
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def create_model(name, pretrained=False, **kwargs):
        assert not pretrained  # the checkpoint's weights replace them
        raise LocalEntryNotFoundError("config.json is not in the local cache")

    def resolve(host, *args):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/data/hf-cache")
    name = "hf-hub:timm/resnet18.a1_in1k"
    with weights_from_checkpoint(), pytest.raises(UsageError) as err:
        TimmNet(num_classes=3, image_shape=(3, 32, 32), name=name, pretrained=True)
    assert str(err.value) == (
        f"cannot download the timm network config of {name} (huggingface.co does not resolve: no network): the "
        "checkpoint holds its weights, not its architecture; run once online to fill /data/hf-cache"
    )


def test_timm_missing_or_unknown_name_fail_in_one_line(capsys, monkeypatch) -> None:
    pytest.importorskip("timm")
    err = fails(capsys, "fit", "--model.net", "TimmNet", "--model.net.name", "convnext_tinny")
    assert "convnext_tinny: no timm network; did you mean convnext_tiny" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    err = fails(capsys, "fit", "--model.net", "TimmNet")
    # `pip install 'cifar-cli[timm]'` failed: PyPI has no cifar-cli; the extra is installed from the repository.
    assert err.endswith(
        "TimmNet needs timm: pip install 'timm>=1.0.21', or in cifar-cli's folder pip install -e '.[timm]'"
    )


def test_backbone_finetuning_resumes_exactly_after_the_unfreezing(fake_cifar10: Path, tmp_path: Path) -> None:
    # Resumed in the middle of the epoch that unfroze the backbone: Lightning does not call the callback's
    # on_train_epoch_start there, and the backbone stayed frozen until cifar-cli's on_train_start unfroze it.
    resume_at = "epoch=1-step=4"
    from test_resume import EVERY_STEP, assert_identical, cifar, tensors

    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), tmp_path / "weights.pth")
    args = [*cifar(fake_cifar10), *EVERY_STEP, *QUIET, "--trainer.max_epochs", "2", "--model.net", "TorchvisionNet"]
    args += ["--trainer.limit_train_batches", "3"]  # 3 steps an epoch
    args += ["--model.net.name", "shufflenet_v2_x0_5", "--model.net.weights_path", str(tmp_path / "weights.pth")]
    args += ["--trainer.callbacks+=BackboneFinetuning", "--trainer.callbacks.unfreeze_backbone_at_epoch", "1"]
    for run in ("full", "resumed"):
        (tmp_path / run).mkdir()
    os.chdir(tmp_path / "full")
    main(["fit", *args])
    os.chdir(tmp_path / "resumed")
    main(["fit", *args, "--ckpt_path", str(tmp_path / "full" / "steps" / f"{resume_at}.ckpt")])
    resumed = sorted(Path("steps").glob("epoch=*.ckpt"))
    assert len(resumed) == 6 - int(resume_at.rsplit("=", 1)[1])
    for path in resumed:
        assert_identical(tensors(path.resolve()), tensors(tmp_path / "full" / "steps" / path.name))
    assert not torch.equal(*(tensors(p)["weights.net.model.conv1.0.weight"] for p in resumed[:2]))  # it trains


def test_an_image_folder_at_224_px_trains_a_torchvision_network_by_name(image_folder) -> None:
    args = ["--data.image_size", "224", "--model.net", "TorchvisionNet", "--model.net.name", "resnet18"]
    args += ["--data.batch_size", "4", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    main(["fit", *folder_args(image_folder, *args)])
    checkpoint = torch.load(only_checkpoint(), weights_only=True)
    assert checkpoint["global_step"] == 1 and checkpoint["state_dict"]["net.model.fc.weight"].shape == (3, 512)
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["name"] == "resnet18"


def test_backbone_finetuning_trains_the_backbone_at_backbone_lr_factor(fake_cifar10: Path) -> None:
    # BackboneFinetuning adds the backbone at half the head's learning rate (backbone_initial_ratio_lr), then
    # doubles it every epoch up to the head's; --model.backbone_lr_factor 0.1 scales all of it. Before, the backbone
    # rose to the head's own learning rate: the factor applied to its BatchNorm parameters alone.
    from test_resume import cifar

    args = [*cifar(fake_cifar10), *QUIET, "--trainer.max_epochs", "4", "--trainer.limit_train_batches", "1"]
    args += ["--model.net", "TorchvisionNet", "--model.net.name", "shufflenet_v2_x0_5"]
    args += ["--model.learning_rate", "0.01", "--model.backbone_lr_factor", "0.1"]
    args += ["--trainer.callbacks+=BackboneFinetuning", "--trainer.callbacks.unfreeze_backbone_at_epoch", "1",
             "--trainer.callbacks.backbone_initial_ratio_lr", "0.5"]  # fmt: skip
    args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k", "-1"]
    args += ["--trainer.callbacks.dirpath", "epochs"]
    main(["fit", *args])
    states = [torch.load(f"epochs/epoch={e}-step={e + 1}.ckpt", weights_only=True) for e in range(4)]
    groups = [state["optimizer_states"][0]["param_groups"] for state in states]
    assert [len(g) for g in groups] == [2, 3, 3, 3]  # head, the backbone's BatchNorm; the backbone from epoch 1
    assert [round(g[-1]["lr"], 8) for g in groups[1:]] == [0.0005, 0.001, 0.001]
    assert [g[0]["lr"] for g in groups] == [0.01] * 4 and [g[1]["lr"] for g in groups] == pytest.approx([0.001] * 4)


def test_backbone_finetuning_adds_the_backbone_at_the_weight_decay_of_backbone_lr_factor(fake_cifar10: Path) -> None:
    # --model.backbone_lr_factor 0.1 trains the backbone at ten times the weight decay (the decay per step, learning
    # rate times weight decay, the head's), also where BackboneFinetuning adds it. Before, the group it added had
    # the optimizer's own weight decay: a tenth of the decay per step of the backbone's BatchNorm beside it.
    from test_resume import cifar

    args = [*cifar(fake_cifar10), *QUIET, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1"]
    args += ["--model.net", "TorchvisionNet", "--model.net.name", "shufflenet_v2_x0_5"]
    args += ["--model.optimizer", "SGD", "--model.learning_rate", "0.01", "--model.weight_decay", "0.001"]
    args += ["--model.backbone_lr_factor", "0.1"]
    args += ["--trainer.callbacks+=BackboneFinetuning", "--trainer.callbacks.unfreeze_backbone_at_epoch", "1"]
    args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k", "-1"]
    args += ["--trainer.callbacks.dirpath", "epochs"]
    main(["fit", *args])
    groups = torch.load("epochs/epoch=1-step=2.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert len(groups) == 3  # the head; the backbone's BatchNorm; the rest of the backbone, from epoch 1
    assert [g["weight_decay"] for g in groups] == pytest.approx([0.001, 0.01, 0.01])


class GroupRates(Callback):
    """Records every step's epoch and learning rates, one per parameter group."""

    seen: list[tuple[int, list[float]]] = []

    def on_train_batch_start(self, trainer: Trainer, *args) -> None:
        GroupRates.seen.append((trainer.current_epoch, [group["lr"] for group in trainer.optimizers[0].param_groups]))


@pytest.mark.parametrize("resume", [False, True])
def test_backbone_finetuning_with_a_schedule_schedules_the_backbone_too(fake_cifar10: Path, resume: bool) -> None:
    # The backbone's group, added at epoch 1 at a tenth of the head's rate, follows the schedule from there, as the
    # head's does. Before, the schedule's next step failed with "ValueError: zip() argument 2 is shorter than
    # argument 1": torch's schedulers know only the groups they were built with.
    from test_resume import cifar

    args = [*cifar(fake_cifar10), *QUIET, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3"]
    args += ["--model.net", "TorchvisionNet", "--model.net.name", "shufflenet_v2_x0_5", "--model.learning_rate", "0.01"]
    args += ["--model.lr_schedule", "WarmupLinearDecay", "--trainer.callbacks+=test_pretrained.GroupRates"]
    args += ["--trainer.callbacks+=BackboneFinetuning", "--trainer.callbacks.unfreeze_backbone_at_epoch", "1"]
    args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true"]
    args += ["--trainer.callbacks.dirpath", "ckpts"]
    GroupRates.seen = []
    if resume:  # stopped 2 steps into the unfreezing epoch, then resumed with the rest of the 9 steps
        main(["fit", *args, "--trainer.max_steps", "5"])
        main(["fit", *args, "--ckpt_path", "last"])
    else:
        main(["fit", *args])
        warmup = [0.01 * (0.2 + 0.8 * step / 9 / 0.23) for step in range(3)]  # 9 steps, warm-up to 23%
        assert [rates[0] for _, rates in GroupRates.seen[:3]] == pytest.approx(warmup)
    assert len(GroupRates.seen) == 9
    assert GroupRates.seen[3][1][-1] == pytest.approx(0.1 * GroupRates.seen[3][1][0])  # a tenth of the head's
    for epoch in (1, 2):
        ratios = [rates[-1] / rates[0] for seen_epoch, rates in GroupRates.seen[3:] if seen_epoch == epoch]
        assert ratios == pytest.approx([ratios[0]] * len(ratios))  # the backbone follows the head's schedule
