"""``qvl-data verify``: every shard of a build against its manifest, byte for byte (sha256): its row shards
and the image shards (of its image store) that its rows use.

The re-run and every reader check each shard's size and Arrow structure (``shards.shard_problem``), which
is cheap; a flipped byte in the data only shows in the sha256 the build recorded for each shard, which
reading every byte finds here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from qvl_data.image_store import image_shard_problem, image_shard_size_problem, store_path
from qvl_data.shards import load_manifest, open_image_shard_table, shard_problem

#: What to do about the damaged shards that :func:`verify_build` lists.
REPAIR = (
    "repair: delete the damaged file(s) and re-run the same `qvl-data build` (it redoes only their "
    "partitions), or rebuild everything with `qvl-data build --force`"
)


@dataclass
class Verification:
    shards: int = 0  # row shards the manifest lists
    image_shards: int = 0  # image shards (of its image store) the manifest lists
    bytes: int = 0  # their recorded size, all together
    damaged: list[str] = field(default_factory=list)  # one line per damaged shard: its path and why


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_build(out_dir: str | Path) -> Verification:
    """Check every shard the manifest of ``out_dir`` lists: present, a regular file, its recorded size,
    schema and row count, and its recorded sha256. A missing or foreign manifest is a QvlError."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    result = Verification(shards=len(manifest.shards), bytes=sum(s.bytes for s in manifest.shards))
    for shard in manifest.shards:
        path = out_dir / shard.file
        problem = shard_problem(path, shard, manifest.pixel_format, manifest.geometry)
        if problem is None and shard.sha256 and _sha256(path) != shard.sha256:
            problem = f"{path}: damaged shard (its sha256 differs from the manifest's)"
        if problem is not None:
            result.damaged.append(problem)
    store = manifest.image_store
    for entry in store.shards if store is not None else []:
        path = store_path(store, out_dir) / entry.file
        result.image_shards += 1
        result.bytes += entry.bytes
        problem = image_shard_size_problem(path, entry)
        if problem is None:
            try:
                structure = image_shard_problem(
                    open_image_shard_table(path), manifest.pixel_format, manifest.geometry
                )
            except (OSError, ValueError) as e:
                structure = f"unreadable Arrow stream: {e}"
            if structure is not None:
                problem = f"{path}: damaged image shard ({structure})"
            elif _sha256(path) != entry.sha256:
                problem = f"{path}: damaged image shard (its sha256 differs from the manifest's)"
        if problem is not None:
            result.damaged.append(problem)
    return result
