"""Read an offline W&B run the way `wandb sync` would: from the records of its `run-<id>.wandb` file.

wandb has no public reader for this file; its format is a LevelDB-style log of protobuf `Record`s: a 7-byte
header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    ident, _, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    folder: Path
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    # Logged artifacts: name, type, aliases, metadata and the files of their manifest (path -> local copy).
    artifacts: list[dict] = field(default_factory=list)

    def table(self, key: str) -> dict:
        """The last W&B table logged under `key`, as `wandb sync` uploads it: from the table's own artifact
        (`run-<id>-<key>`), whose staged files hold the JSON and the images. `{"columns", "data", "files"}`, with
        `files` mapping each of the artifact's paths (`media/images/...png`) to its staged copy."""
        entry = {k.split("/", 1)[1]: v for k, v in self.summary.items() if k.startswith(f"{key}/")}
        assert entry.get("_type") == "table-file", entry
        artifact = [a for a in self.artifacts if a["type"] == "run_table" and a["name"].endswith(f"-{key}")][-1]
        (json_path,) = [local for path, local in artifact["files"].items() if path.endswith(".table.json")]
        return {**json.loads(Path(json_path).read_text()), "files": artifact["files"]}

    @property
    def aliases(self) -> dict[str, dict]:
        """Each alias of the logged artifacts, with the artifact that holds it last (W&B moves an alias to the
        newest version given it; every logged version is given `latest`)."""
        return {alias: a for a in self.artifacts for alias in a["aliases"]}

    @property
    def images(self) -> list[Path]:
        return sorted((self.folder / "files" / "media" / "images").glob("*.png"))


def read_run(folder: Path) -> OfflineRun:
    """Config, final summary, history rows and artifacts of the offline run in `folder` (runs/wandb/offline-run-*)."""
    (path,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            run.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            a = record.artifact
            files = {c.path: c.local_path for c in a.manifest.contents}
            metadata = json.loads(a.metadata) if a.metadata else {}
            run.artifacts.append(
                {"name": a.name, "type": a.type, "aliases": list(a.aliases), "metadata": metadata, "files": files}
            )
    return run
