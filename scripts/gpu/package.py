"""Packaging for a lent GPU machine: what must travel, in pieces that fit the device tool's limits.

The device machine reaches no registry and each `run` call carries at most 64 MiB: the repository's working
tree (tracked and untracked-not-ignored files; the shipped exits alone are 43 MB) plus the paths named in
`carry`. So everything else the plan needs (the default model's GGUF, the wheels the device image lacks, the
Spec-Bench questions, the instructions for self-distillation) goes into one tar, split into pieces that each
fit beside the tree. Calls 1..N-1 stash one piece each in an ignored folder that stays on the warm machine;
call N carries the last piece, reassembles the tar, checks every sha256 and runs the plan.

Standard library only (it also runs on the device before anything is installed), except `packaging`, which
only the wheel check needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
CALL_LIMIT = 64 * MiB  # the working tree plus carried paths, per call
CALL_MARGIN = 1 * MiB  # room for files the session adds between prepare and the calls (notes, results)
MAX_PIECE = 48 * MiB
MAX_CARRY_PATHS = 8
MAX_COMMAND = 2000
RETURN_FILE_LIMIT = 16 * MiB  # per file brought back from $OUT
RETURN_MAX_FILES = 8
KIT_DIR = ".gpukit"  # ignored: pieces to carry here, the stash there
PIECE_NAME = "piece-{:02d}"
PIECES_FILE = "pieces.json"
MANIFEST = "MANIFEST.json"  # first member of the tar: sha256 of every other member
DEVICE_PACKAGES = Path(__file__).with_name("device_packages.txt")
WHEELS_FILE = Path(__file__).with_name("wheels.txt")
# the device's python3 (KINDS.md); manylinux tags as the device README's Notes give them
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes(repo: Path) -> int:
    """Bytes of what every call sends whatever it carries: tracked and untracked-not-ignored files, and a
    shared/ folder inside the checkout (which travels even when ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            check=True, capture_output=True).stdout.decode().split("\0")
    paths = {repo / p for p in listed if p}
    if (repo / "shared").is_dir():
        paths |= {p for p in (repo / "shared").rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def piece_budget(tree: int) -> int:
    """The largest piece one call can carry beside the tree (and its small pieces.json)."""
    budget = min(MAX_PIECE, CALL_LIMIT - CALL_MARGIN - tree)
    if budget < 4 * MiB:
        raise SystemExit(f"error: the working tree is {tree / MiB:.1f} MiB, which leaves no room to carry pieces "
                         "under the 64 MiB a call takes; move large untracked files out of the checkout")
    return budget


def write_payload(tar_path: Path, members: dict[str, Path]) -> dict[str, str]:
    """A plain tar of `members` (name in the tar -> file here), MANIFEST.json first. Returns the manifest."""
    manifest = {name: sha256(path) for name, path in sorted(members.items())}
    manifest_path = tar_path.with_name(MANIFEST)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(manifest_path, MANIFEST)
        for name, path in sorted(members.items()):
            tar.add(path, name)
    manifest_path.unlink()
    return manifest


def split(path: Path, piece_bytes: int, dest: Path) -> list[dict]:
    """Cut `path` into dest/<k>/piece-<k> (k from 1) of at most piece_bytes; returns [{name, bytes, sha256}]."""
    pieces = []
    with open(path, "rb") as f:
        k = 1
        while True:
            data = f.read(piece_bytes)
            if not data:
                break
            folder = dest / str(k)
            folder.mkdir(parents=True, exist_ok=True)
            piece = folder / PIECE_NAME.format(k)
            piece.write_bytes(data)
            pieces.append({"name": piece.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            k += 1
    return pieces


def check_piece(folder: Path, entry: dict) -> str | None:
    """None when folder holds the piece as recorded, else what is wrong with it."""
    path = folder / entry["name"]
    if not path.is_file():
        return f"{entry['name']} is missing"
    if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
        return f"{entry['name']} is damaged (sha256 differs)"
    return None


def assemble(folder: Path, record: dict, tar_path: Path) -> None:
    """Concatenate the pieces in `folder` into tar_path and check the whole tar's sha256."""
    with open(tar_path, "wb") as out:
        for entry in record["pieces"]:
            with open(folder / entry["name"], "rb") as f:
                while block := f.read(8 * MiB):
                    out.write(block)
    if sha256(tar_path) != record["sha256"]:
        raise SystemExit(f"error: the reassembled {tar_path} does not match its sha256")


def extract(tar_path: Path, dest: Path) -> dict[str, str]:
    """Unpack the payload and check each member against MANIFEST.json; returns the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    manifest = json.loads((dest / MANIFEST).read_text())
    bad = [name for name, digest in manifest.items() if sha256(dest / name) != digest]
    if bad:
        raise SystemExit(f"error: payload members differ from their sha256: {', '.join(bad)}")
    return manifest


# ---- the calls a session pastes into the device tool ----

@dataclass
class Call:
    command: str
    carry: list[str]
    timeout_s: int

    def to_dict(self) -> dict:
        return {"command": self.command, "carry": self.carry, "timeout_s": self.timeout_s}


def calls(n_pieces: int, plan_flags: str = "", run_timeout_s: int = 600) -> list[Call]:
    """Calls 1..N-1 stash a piece each; call N carries the last piece and runs everything."""
    kit = "PYTHONUNBUFFERED=1 python3 scripts/gpu/kit.py"
    out = [Call(f"{kit} device-stash {k}", [f"{KIT_DIR}/carry/{k}"], 120) for k in range(1, n_pieces)]
    run = (f"set -o pipefail; {kit} device-run {plan_flags}".rstrip() + " 2>&1 | tee $OUT/log.txt")
    out.append(Call(run, [f"{KIT_DIR}/carry/{n_pieces}"], run_timeout_s))
    return out


def check_calls(call_list: list[Call], kit: Path, tree: int) -> list[str]:
    """What breaks the device tool's limits (empty when nothing does); carried paths are read under `kit`
    (the folder the calls name .gpukit)."""
    problems = []
    for i, call in enumerate(call_list, 1):
        if len(call.command) > MAX_COMMAND:
            problems.append(f"call {i}: command is {len(call.command)} characters (at most {MAX_COMMAND})")
        if len(call.carry) > MAX_CARRY_PATHS:
            problems.append(f"call {i}: carries {len(call.carry)} paths (at most {MAX_CARRY_PATHS})")
        carried = sum(carried_bytes(kit, c) for c in call.carry)
        if tree + carried > CALL_LIMIT:
            problems.append(f"call {i}: tree {tree / MiB:.1f} MiB + carried {carried / MiB:.1f} MiB is over 64 MiB")
    return problems


def carried_bytes(kit: Path, carried: str) -> int:
    return folder_bytes(kit / Path(carried).relative_to(KIT_DIR))


# ---- wheels the device image lacks ----

def read_requirements_file(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def device_packages(path: Path = DEVICE_PACKAGES) -> dict[str, str | None]:
    """normalised name -> version (None where KINDS.md gives none)."""
    out = {}
    for line in read_requirements_file(path):
        name, _, version = line.partition("==")
        out[normalise(name)] = version or None
    return out


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(dest: Path, python: str, pins: list[str]) -> list[Path]:
    """`pip download` the pinned wheels for the device's Python and platform (no dependencies: wheels.txt
    names each one the device lacks)."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest),
                    *pins], check=True)
    wanted = {normalise(p.split("==")[0]): p.split("==")[1] for p in pins}
    wheels = []
    for wheel in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        if wanted.get(name) == version:
            wheels.append(wheel)
    if len(wheels) != len(pins):
        raise SystemExit(f"error: expected {len(pins)} wheels in {dest}, found {len(wheels)}")
    return wheels


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return normalise(name), version


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.split("\n\n")[0].splitlines()
            if line.startswith("Requires-Dist:")]


def unmet_requirements(requirements: dict[str, list[str]], provided: dict[str, str | None],
                       python: str = "3.12.3") -> tuple[list[str], list[str]]:
    """(unmet, unverified) for {who: [requirement strings]} against provided {name: version or None} on the
    device (Linux x86_64, `python`). Requirements of extras and of other platforms are skipped; a provided
    package whose version is unknown satisfies its name only, and is listed as unverified."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    env = {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python,
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    unmet, unverified = [], []
    for who, lines in requirements.items():
        for line in lines:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = normalise(req.name)
            if name not in provided:
                unmet.append(f"{who} needs {line}: not on the device and not carried")
            elif provided[name] is None:
                if str(req.specifier):
                    unverified.append(f"{who} needs {line}: the device's version is not recorded")
            elif not req.specifier.contains(Version(provided[name]), prereleases=True):
                unmet.append(f"{who} needs {line}: the device has {provided[name]}")
    return unmet, unverified


def project_requirements(repo: Path) -> list[str]:
    """balspec's own dependencies, from pyproject.toml."""
    import tomllib

    return tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]


def carried_wheel_report(repo: Path, wheels: list[Path]) -> dict:
    """Do the device's packages plus these wheels satisfy balspec and every carried wheel?"""
    provided = {**device_packages(), **dict(wheel_name_version(w) for w in wheels)}
    requirements = {"balspec": project_requirements(repo), **{w.name: wheel_requirements(w) for w in wheels}}
    unmet, unverified = unmet_requirements(requirements, provided, device_packages()["python"])
    return {"unmet": unmet, "unverified": unverified}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def human(n: int) -> str:
    return f"{n / MiB:.1f} MiB"
