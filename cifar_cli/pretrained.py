"""Networks by name from torchvision and timm, with their pretrained weights and a new head for the data's classes.

`--model.net TorchvisionNet --model.net.name resnet18 --model.net.weights DEFAULT` and `--model.net TimmNet
--model.net.name convnext_tiny --model.net.pretrained true` build the named architecture, load its weights, and
replace its classifier head with a fresh one of `num_classes` outputs, wherever the architecture keeps it (`fc`,
`classifier[-1]`, `heads.head`, ...). Like `cifar_cli.nets`, plain `nn.Module`s without Lightning.

Each exposes `backbone` (everything but the head: what Lightning's `BackboneFinetuning` freezes, and what the
classifier's `backbone_lr_factor` applies to) and the mean and std the weights were trained with, which the
classifier normalises the images with instead of the data's own.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn
from torchvision import models

from cifar_cli.errors import UsageError
from cifar_cli.scoped import set_during

# Whether the networks built now get their weights from a checkpoint right after (`--ckpt_path`): they are then built
# without their pretrained weights, neither downloaded nor read from `weights_path`, which the machine that tests or
# predicts with the checkpoint may not have; the mean and std those weights expect are still theirs. A context
# variable, set by CifarCLI around instantiation: LightningCLI builds the network deep inside the model's arguments.
_WEIGHTS_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("weights_from_checkpoint", default=False)


# The architecture of the checkpoint's `hf-hub:` or `local-dir:` network (TimmNet), as the checkpoint keeps it under
# TIMM_CONFIG_KEY: `{"name": ..., "config": <its config.json>}`, set with _WEIGHTS_FROM_CHECKPOINT.
_SAVED_TIMM_CONFIG: ContextVar[dict | None] = ContextVar("saved_timm_config", default=None)
TIMM_CONFIG_KEY = "timm_config"


@contextlib.contextmanager
def weights_from_checkpoint(yes: bool = True, timm_config: dict | None = None) -> Iterator[None]:
    """Networks built in this block leave their pretrained weights out: a checkpoint's replace them. `timm_config`:
    the checkpoint's TIMM_CONFIG_KEY entry, which a TimmNet of its name is built from."""
    with set_during(_WEIGHTS_FROM_CHECKPOINT, yes), set_during(_SAVED_TIMM_CONFIG, timm_config if yes else None):
        yield


def saved_timm_config(checkpoint: dict) -> dict | None:
    """The checkpoint's TIMM_CONFIG_KEY entry, where it is one (checkpoints of other networks, and of earlier
    versions, have none)."""
    saved = checkpoint.get(TIMM_CONFIG_KEY)
    valid = isinstance(saved, dict) and isinstance(saved.get("name"), str) and isinstance(saved.get("config"), dict)
    return saved if valid else None


# The statistics of ImageNet's training images, 0-1 scale: what torchvision's and most timm weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Parts(nn.Module):
    """Modules and parameters of a network, held again under one module: its backbone.

    Built on demand and never assigned to the network, so every tensor keeps one name in the state_dict. Lightning's
    finetuning callbacks freeze and unfreeze `modules()` and leaf parameters, both of which this holds.
    """

    def __init__(self, modules: Iterable[nn.Module], parameters: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.own = nn.ParameterList(parameters)


class NamedNet(nn.Module):
    """A library's network held as `model`, whose head at `head_path` has `num_classes` outputs."""

    model: nn.Module
    head_path: str
    # Every new head: `head_path`, and the others of networks with more than one (a distilled DeiT's `head_dist`,
    # whose logits its forward averages with the head's).
    head_paths: tuple[str, ...]
    name: str  # the architecture, as the library names it
    # Mean and std (0-1 scale, per channel) the images are normalised with; None: the data's own statistics.
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    @property
    def backbone(self) -> Parts:
        """Every module and parameter but the heads'. Walks the paths to the heads: the other children of each module
        on them belong to the backbone, as do parameters held directly by a module on them (a ViT's class token). A
        second head (a distilled DeiT's `head_dist`), new and random, was counted in the backbone: frozen by
        BackboneFinetuning, and trained at `backbone_lr_factor`, while the forward pass averaged its logits in."""
        heads = self.head_paths
        modules: list[nn.Module] = []
        parameters: list[nn.Parameter] = []

        def walk(node: nn.Module, path: str) -> None:
            parameters.extend(node.parameters(recurse=False))
            for name, child in node.named_children():
                child_path = f"{path}{name}"
                if child_path in heads:
                    continue
                if any(head.startswith(f"{child_path}.") for head in heads):
                    walk(child, f"{child_path}.")
                else:
                    modules.append(child)

        walk(self.model, "")
        return Parts(modules, parameters)


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else f"{len(known)} are known"


def check_weights_file(path: str, flag: str) -> Path:
    """The file `flag` names, or a one-line refusal where it is missing or a folder."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give the weights file in it (.pth, .pt or .safetensors)")
    if not file.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return file


def load_weights_file(path: str, flag: str) -> dict[str, Tensor]:
    """A state dict from a `.pth`/`.pt` (weights-only load) or `.safetensors` file."""
    file = check_weights_file(path, flag)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message opens with advice to load the file without `weights_only`, which cifar-cli never does
        # (and which would not read a JPEG either): say what the file holds instead.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = (
            f"it holds a {refused[1]}, which weights-only loading refuses: save the network's state_dict() instead"
            if refused
            else "not a file torch.save wrote"
        )
        raise UsageError(f"{flag} {path} is not a weights file ({what})") from err
    except Exception as err:  # a damaged or foreign file raises anything from the unpickler or the zip
        with open(file, "rb") as head:
            damaged = head.read(4) == b"PK\x03\x04"  # the zip format torch.save writes, cut short
        what = "the file is truncated or damaged" if damaged else "not a file torch.save wrote"
        what = f"not a safetensors file: {err}" if file.suffix == ".safetensors" else f"{what}: {type(err).__name__}"
        raise UsageError(f"{flag} {path} is not a weights file ({what})".split("\n")[0]) from err
    # A cifar-cli checkpoint holds the network under `net.`, with its own head and normalisation: its tensors were
    # all said not to fit ("242 problems: bn1.bias is missing; ...") where they would. --model.init_from takes it.
    nested = state.get("state_dict") if isinstance(state, dict) else None
    if isinstance(nested, dict) and "pytorch-lightning_version" in state and any(k.startswith("net.") for k in nested):
        raise UsageError(
            f"{flag} {path} is a cifar-cli checkpoint, not the network's state dict: start from its weights with "
            f"--model.init_from {path}"
        )
    # Checkpoints of other trainers nest the weights one level down; DDP-wrapped ones prefix them with `module.`.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"{flag} {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, Tensor], head_path: str | tuple[str, ...], flag: str) -> None:
    """Load `state` into `model`, every tensor but the head's (or heads'), which may have another class count; one
    line names what does not fit."""
    head = tuple(f"{path}." for path in ((head_path,) if isinstance(head_path, str) else head_path))
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    problems = fit_problems(own, body)
    if problems:
        raise UsageError(
            f"{flag}: the weights do not fit this architecture ({len(problems)} problems: {'; '.join(problems[:3])})"
        )
    model.load_state_dict(body, strict=False)


def fit_problems(own: dict[str, Tensor], state_dict: dict[str, Tensor]) -> list[str]:
    """What keeps `state_dict` from loading into a module whose state dict is `own`, sorted: names missing,
    unexpected, or of another shape."""
    problems = [f"{k} is missing" for k in own.keys() - state_dict.keys()]
    problems += [f"{k} is unexpected" for k in state_dict.keys() - own.keys()]
    problems += [
        f"{k} has shape {tuple(v.shape)} but the model needs {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    return sorted(problems)


def final_layer(model: nn.Module, outputs: int) -> str:
    """The path of the layer that produces the logits: the last Linear (or 1x1 Conv2d, as in SqueezeNet) with
    `outputs` outputs, in definition order, which is the order of the forward pass in torchvision's classifiers."""
    found = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) and module.out_features == outputs)
        or (isinstance(module, nn.Conv2d) and module.out_channels == outputs and module.kernel_size == (1, 1))
    ]
    if not found:
        raise UsageError(f"cannot find the head of {type(model).__name__} (no layer with {outputs} outputs)")
    return found[-1]


def new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    assert isinstance(old, nn.Conv2d)
    return nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)


class TorchvisionNet(NamedNet):
    """Any classification network of torchvision (`torchvision.models.list_models()`), with its named weights.

    The weights are downloaded into torch's cache (`$TORCH_HOME/hub/checkpoints`, by default
    `~/.cache/torch/hub/checkpoints`) on first use. Offline, put the file there, or pass `weights_path`.

    Args:
        num_classes: Outputs of the new head; the CLI links it from the data.
        image_shape: `(channels, height, width)` of the input images; the CLI links it from the data.
        name: The architecture, as torchvision names it: `resnet18`, `convnext_tiny`, `vit_b_16`, ...
        weights: Pretrained weights by name: `DEFAULT` (the best torchvision has), or one of the architecture's
            weights enum (`IMAGENET1K_V2`, or `ResNet50_Weights.IMAGENET1K_V2`); None: random initialisation.
        weights_path: A local state dict of the architecture (`.pth` or `.safetensors`), loaded instead of `weights`.
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        name: str = "resnet18",
        weights: str | None = None,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        known = models.list_models(module=models)
        if name not in known:
            raise UsageError(
                f"--model.net.name {name}: no torchvision classification network; "
                f"{timm_hint(name, known) or suggest(name, known)}"
            )
        kwargs = {}
        if name in ("googlenet", "inception_v3"):
            # Built as torchvision builds them for their weights: the auxiliary heads are dropped below, and the
            # weights' own input transform is kept, as their ImageNet accuracy was measured with it.
            kwargs = {"aux_logits": True, "init_weights": weights is None and weights_path is None}
            kwargs["transform_input"] = weights is not None or weights_path is not None
        enum = resolve_weights(name, weights) if weights is not None else None
        from_checkpoint = _WEIGHTS_FROM_CHECKPOINT.get()
        flag = "--model.net.weights_path"
        state = load_weights_file(weights_path, flag) if weights_path is not None and not from_checkpoint else None
        size = vit_image_size(name, enum, state, image_shape if from_checkpoint and weights_path is not None else None)
        if size is not None:
            kwargs["image_size"] = size
        model = models.get_model(name, weights=None, **kwargs)
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
                model.aux_logits = False
        outputs = final_layer_outputs(model)
        self.head_path = final_layer(model, outputs)
        self.head_paths = (self.head_path,)
        if from_checkpoint:
            pass  # the checkpoint's weights replace them
        elif state is not None:
            load_into(model, state, self.head_path, flag)
        elif enum is not None:
            load_into(model, download_weights(name, enum), self.head_path, "--model.net.weights")
        if enum is not None or weights_path is not None:
            transforms = enum.transforms() if enum is not None else None
            self.input_mean = tuple(getattr(transforms, "mean", IMAGENET_MEAN))
            self.input_std = tuple(getattr(transforms, "std", IMAGENET_STD))
        parent, _, leaf = self.head_path.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, new_layer(holder.get_submodule(leaf), num_classes))
        self.model = model
        self.name = name


def vit_image_size(
    name: str, enum: models.WeightsEnum | None, state: dict[str, Tensor] | None, trained: tuple[int, ...] | None
) -> int | None:
    """The image side to build a torchvision ViT for (None: its default, 224), as torchvision's builder builds it for
    weights it downloads: their position embedding fits that side alone. Built at 224, ViTs refused their SWAG
    weights (`vit_b_16` IMAGENET1K_SWAG_E2E_V1 at 384 px, `vit_h_14`'s DEFAULT at 518) as weights that do not fit.

    From the weights file `state` where one is read (its position embedding's length), else from the image shape
    the run trained with (`trained`: the file is not read when a checkpoint's weights replace it), else from the
    named weights' `enum`."""
    if not name.startswith("vit_"):
        return None
    if state is not None:
        embedding = state.get("encoder.pos_embedding")
        tokens = embedding.shape[1] - 1 if embedding is not None and embedding.ndim == 3 else 0
        side = math.isqrt(tokens)
        patch = int(name.rpartition("_")[2])  # vit_b_16, vit_h_14
        return side * patch if tokens and side * side == tokens else None
    if trained is not None:
        return int(trained[-1])
    return int(enum.meta["min_size"][0]) if enum is not None else None


def timm_hint(name: str, torchvision_names: list[str]) -> str | None:
    """Where a name TorchvisionNet does not know is timm's (`deit_tiny_patch16_224`, `efficientnet_b0.ra_in1k`), how
    to build it: close torchvision names alone sent the user looking for a spelling that was right."""
    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    if not timm.is_model(name):
        return None
    hint = f"it is timm's: --model.net TimmNet --model.net.name {name}"
    arch = name.partition(".")[0]
    if arch != name and arch in torchvision_names:  # a timm weights tag on a name torchvision has too
        hint += f", or torchvision's {arch} with --model.net.weights DEFAULT"
    return hint


def timm_converted(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """`state` as timm converts a file for `model` when it loads pretrained weights (`checkpoint_filter_fn` of the
    network's module: position embeddings resampled to another image size, an original repository's layout); None
    where the module has none, or it cannot convert this file."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        try:
            converted = convert(dict(state), model)
        except TypeError:  # older filters take the state dict alone, as timm's loader allows
            converted = convert(dict(state))
    except Exception:  # a file the filter does not know: what did not fit is said of the file as it is
        return None
    return converted if isinstance(converted, dict) else None


def final_layer_outputs(model: nn.Module) -> int:
    """The class count a torchvision network was built with (1000 unless told otherwise)."""
    return int(getattr(model, "num_classes", 1000))


def resolve_weights(name: str, weights: str) -> models.WeightsEnum:
    enum = models.get_model_weights(name)
    key = weights.rpartition(".")[2] if weights.startswith(enum.__name__ + ".") else weights
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # (newer torchvision lists DEFAULT too)
        raise UsageError(f"--model.net.weights {weights}: {name} has the weights {choices}") from None


def download_weights(name: str, weights: models.WeightsEnum) -> dict[str, Tensor]:
    """The weights' state dict, from torch's cache or downloaded into it; offline, one line says where the file goes."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / os.path.basename(weights.url)
    cached = file.is_file()  # torch loads it without a download or a check of its hash

    def offline(reason: object) -> UsageError:
        return UsageError(
            f"cannot download the {name} weights {weights} ({reason}): put {file.name} from {weights.url} in "
            f"{folder}/, or pass --model.net.weights_path FILE"
        )

    if not cached and unreachable(weights.url):
        # Without a request: torch prints its `Downloading: "<url>" to <file>` line before it fails, a second line.
        raise offline(f"{urllib.parse.urlsplit(weights.url).hostname} does not resolve: no network")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        if cached:  # put there by hand, as the line below says, and cut short or of another kind
            reason = str(err).split("\n")[0].split(". ")[0]
            raise UsageError(
                f"the {name} weights {weights} in {file} do not load ({type(err).__name__}: {reason}): remove the "
                f"file to download it again, or replace it with {file.name} from {weights.url}"
            ) from err
        if not isinstance(err, (urllib.error.URLError, OSError)):
            raise
        raise offline(getattr(err, "reason", None) or err) from err


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode: files from its cache only, no request at all. It reads HF_HUB_OFFLINE once,
    at import; its maintainers' way to switch it at run time is the constant."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_unreachable() -> bool:
    """Whether the Hub's host name does not resolve here (and no proxy would resolve it): huggingface_hub retries
    each file five times over about 23 s before it gives up, on a machine without network as anywhere else."""
    from huggingface_hub import constants

    return unreachable(constants.ENDPOINT)


def unreachable(url: str) -> bool:
    """Whether `url`'s host name does not resolve here, and no proxy would resolve it."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    host = urllib.parse.urlsplit(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


TIMM_SOURCES = ("hf-hub:", "local-dir:")
LOCAL_DIR = "local-dir:"


def check_local_dir(name: str) -> None:
    """Refuse a `local-dir:PATH` whose folder is missing or holds no config.json, in one line. timm reads the
    architecture from that file, also where a checkpoint's weights replace the folder's: the error was the Hub's,
    "cannot download the timm weights ... run once online", of a folder that timm never looks for on the Hub."""
    if not name.startswith(LOCAL_DIR):
        return
    folder = Path(name.removeprefix(LOCAL_DIR))
    what = "the folder timm saved with save_for_hf, whose config.json names the architecture"
    if _WEIGHTS_FROM_CHECKPOINT.get():
        what += " (the checkpoint holds the weights, not the architecture)"
    if not folder.is_dir():
        raise UsageError(f"--model.net.name {name}: no such folder {folder}; give {what}")
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model.net.name {name}: {folder} has no config.json; give {what}")


def source_config(name: str) -> dict | None:
    """The config.json that timm built the `hf-hub:` or `local-dir:` network `name` from, which it has just read
    (from the folder, or the Hub's cache); None for a network of timm's registry, whose architecture timm holds."""
    if name.startswith(LOCAL_DIR):
        path = Path(name.removeprefix(LOCAL_DIR)) / "config.json"
    elif name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = name.removeprefix("hf-hub:").partition("@")
        with hub_offline():
            path = Path(hf_hub_download(repo, "config.json", revision=revision or None))
    else:
        return None
    return json.loads(path.read_text())


class TimmNet(NamedNet):
    """Any network of timm (`pip install -e '.[timm]'`), through `timm.create_model(name, pretrained,
    num_classes)`, which builds the new head itself.

    Pretrained weights are downloaded from the Hugging Face Hub into its cache (`$HF_HOME/hub`) on first use.

    Args:
        num_classes: Outputs of the new head; the CLI links it from the data.
        image_shape: `(channels, height, width)` of the input images; the CLI links it from the data.
        name: The architecture with its weights tag, as timm names it: `resnet18`, `convnext_tiny.fb_in22k`, ...;
            or a Hub repository (`hf-hub:timm/resnet18.a1_in1k`) or a folder saved by timm (`local-dir:PATH`).
        pretrained: Load the pretrained weights.
        weights_path: A local state dict of the architecture (`.pth` or `.safetensors`), loaded instead.
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        name: str = "resnet18",
        pretrained: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("timm") is None:
            # `pip install 'cifar-cli[timm]'` asked PyPI for a cifar-cli it does not have: the extra is the folder's.
            raise UsageError(
                "TimmNet needs timm: pip install 'timm>=1.0.21', or in cifar-cli's folder pip install -e '.[timm]'"
            )
        import timm

        known = timm.list_models()
        # `hf-hub:` (a Hub repository) and `local-dir:` (a folder saved by timm) name no registry entry: timm
        # reads the architecture from the repository's or folder's config.json.
        if not name.startswith(TIMM_SOURCES) and name.partition(".")[0] not in known:
            hint = (
                f"it is torchvision's: --model.net TorchvisionNet --model.net.name {name}"
                if name in models.list_models(module=models)
                else suggest(name.partition(".")[0], known)
            )
            raise UsageError(f"--model.net.name {name}: no timm network; {hint}")
        saved = _SAVED_TIMM_CONFIG.get()
        saved = saved["config"] if saved is not None and saved["name"] == name else None
        if saved is None:
            check_local_dir(name)
        # A local file is loaded here, as TorchvisionNet loads it, not by timm: timm loads any weights but a head of
        # the pretrained class count with strict=False, so a file of another network trained from random weights
        # without a word, or ended in "Error(s) in loading state_dict" with nothing of what did not fit.
        state = None
        if weights_path is not None and not _WEIGHTS_FROM_CHECKPOINT.get():
            state = load_weights_file(weights_path, "--model.net.weights_path")
        load = pretrained and weights_path is None and not _WEIGHTS_FROM_CHECKPOINT.get()

        def create() -> nn.Module:
            if saved is None:
                return timm.create_model(name, pretrained=load, num_classes=num_classes)
            # The checkpoint's copy of the config.json, handed to timm as a folder of its own: the architecture the
            # weights were trained in, on a machine without the Hub, its cache or the folder, and whatever the
            # repository holds now.
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "config.json").write_text(json.dumps(saved))
                return timm.create_model(LOCAL_DIR + folder, pretrained=False, num_classes=num_classes)

        no_network = False
        try:
            try:
                with hub_offline():  # weights in the cache load without a request to the Hub
                    model = create()
            except OSError:  # not in the cache: download, where the Hub can be reached
                no_network = hub_unreachable()
                if no_network:
                    raise
                model = create()
        except RuntimeError as err:
            if "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
                raise UsageError(f"--model.net.name {name}: {err}") from err
            raise UsageError(f"--model.net {name}: the weights do not load ({str(err).splitlines()[0]})") from err
        except OSError as err:  # the Hub unreachable and the file not in its cache
            from huggingface_hub import constants

            # As torchvision's weights are said: the exception's name (LocalEntryNotFoundError) told no user why.
            reason = (
                f"{urllib.parse.urlsplit(constants.ENDPOINT).hostname} does not resolve: no network"
                if no_network
                else type(err).__name__
            )
            # The folder huggingface_hub reads, from HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME: it was named from
            # HF_HOME alone, ~/.cache/huggingface/hub wherever that was unset.
            if _WEIGHTS_FROM_CHECKPOINT.get():
                # No weights were asked for (the checkpoint's replace them), but an `hf-hub:` network's architecture
                # is its repository's config.json: the advice to pass a weights file, which a checkpoint ignores,
                # led nowhere.
                raise UsageError(
                    f"cannot download the timm network config of {name} ({reason}): the checkpoint holds "
                    f"its weights, not its architecture; run once online to fill {constants.HF_HUB_CACHE}"
                ) from err
            raise UsageError(
                f"cannot download the timm weights of {name} ({reason}): run once online to fill "
                f"{constants.HF_HUB_CACHE}, or pass --model.net.weights_path FILE"
            ) from err
        self.model = model
        self.name = name
        # Kept in every checkpoint (ImageClassifier.on_save_checkpoint), which then builds the network without it.
        self.timm_config = saved if saved is not None else source_config(name)
        head = model.pretrained_cfg.get("classifier") or "fc"
        self.head_paths = (head,) if isinstance(head, str) else tuple(head)
        self.head_path = self.head_paths[0]
        if state is not None:
            try:
                load_into(model, state, self.head_paths, "--model.net.weights_path")
            except UsageError:
                converted = timm_converted(model, state)
                if converted is None:
                    raise
                load_into(model, converted, self.head_paths, "--model.net.weights_path")
        if pretrained or weights_path is not None:
            self.input_mean = tuple(model.pretrained_cfg.get("mean", IMAGENET_MEAN))
            self.input_std = tuple(model.pretrained_cfg.get("std", IMAGENET_STD))
