"""The model files the pack supports (`weights/models.json`): where each one goes and whether it is there and
intact. Standard library only; nothing of ComfyUI (the check node passes ComfyUI's `folder_paths.get_folder_paths`
as the folder lookup, `tools/models.py` a lookup over one models folder). The verified, resumable download is
`tools/models.py`'s, its only user; a partial download it left (`partial_path`) is reported here.

A family is a Wan backbone (`kind` "backbone": a release of nodes/core/backbones.py, one DiT + its VAE, adapters
attach to it) or a complete model run as published (`kind` "model": InfVSR, whose DiT, VAE and reference encoder
files are listed). Third-party PyTorch pickles (.ckpt/.pth) may only serve model families: their loaders read them
weights-only, or the safetensors copy `python -m tools.infvsr convert` writes once (found as `<stem>.safetensors`).
"""
import hashlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "models.json")
MANIFEST_FORMAT = 1
FOLDERS = ("diffusion_models", "vae", "vae_approx", "text_encoders", "litevsr", "infvsr")
LEGACY_FOLDERS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}  # ComfyUI reads these too
# role -> the folders its files may go to. A decoder (a tiny or light Wan decoder for ComfyUI's stock Load VAE) goes
# where that loader reads it: vae_approx/ for the few names it takes from there, vae/ otherwise (weights/README.md).
ROLES = {"dit": ("diffusion_models",), "vae": ("vae",), "decoder": ("vae", "vae_approx"),
         "text_encoder": ("text_encoders",), "adapter": ("litevsr",), "reference": ("infvsr",)}
KINDS = ("backbone", "model")  # a Wan release adapters attach to; a complete model run as published (InfVSR)
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt", ".bin")  # nodes/core/pickle_file.py's (tested equal)
SAFETENSORS = ".safetensors"
CONVERT_COMMAND = "python -m tools.infvsr convert"
CHECKABLE = ("size", "sha256")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PART_SUFFIX = ".part"
CHUNK = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # plain http only there (tests)

OK, VERIFIED, UNVERIFIED, CONVERTED = "ok", "verified", "present-unverified", "converted"
MISSING, WRONG_SIZE, HASH_MISMATCH = "missing", "wrong-size", "hash-mismatch"
PRESENT = (OK, VERIFIED, UNVERIFIED, CONVERTED)


def is_pickle_name(name):
    return name.lower().endswith(PICKLE_SUFFIXES)


class ModelFileError(Exception):
    """A manifest, check or download problem, with a message meant for the user."""


class ManifestError(ModelFileError):
    pass


@dataclass(frozen=True)
class ModelFile:
    id: str
    role: str
    folder: str
    name: str
    families: tuple
    size: int | None
    sha256: str | None
    source: str
    optional: bool = False
    unverified: tuple = ()
    licence: str | None = None

    @property
    def relative(self):
        return f"{self.folder}/{self.name}"

    @property
    def pickle(self):
        return is_pickle_name(self.name)

    @property
    def converted_name(self):
        """The name `tools.infvsr convert` gives a pickle's safetensors copy (same stem); None for safetensors."""
        return os.path.splitext(self.name)[0] + SAFETENSORS if self.pickle else None


@dataclass(frozen=True)
class Family:
    id: str
    title: str
    dits: tuple  # file ids, preferred first
    vae: str
    default: bool = False
    kind: str = "backbone"  # KINDS
    references: tuple = ()  # file ids of role "reference" the family also needs (a model family's encoder)


@dataclass(frozen=True)
class Manifest:
    files: tuple
    families: tuple

    def file(self, file_id):
        return next(entry for entry in self.files if entry.id == file_id)

    def family_files(self, family, have=None):
        """A DiT, the VAE and the reference files of a family: the first DiT for which have(file_id) is true, else
        the preferred one."""
        dit = next((dit for dit in family.dits if have is not None and have(dit)), family.dits[0])
        return [self.file(dit), self.file(family.vae)] + [self.file(ref) for ref in family.references]

    def select(self, tokens=None, have=None):
        """Files named by tokens (file ids, file names, family ids, or "all"); none: the default families. A family
        contributes the DiT it already has (have(file_id), e.g. a usable check) or else its preferred one."""
        if not tokens:
            chosen = [entry for family in self.families if family.default
                      for entry in self.family_files(family, have)]
        else:
            chosen = []
            for token in tokens:
                chosen.extend(self._resolve(token.strip(), have))
        return list(dict.fromkeys(chosen))

    def _resolve(self, token, have):
        if token == "all":
            return list(self.files)
        for family in self.families:
            if token == family.id:
                return self.family_files(family, have)
        for entry in self.files:
            if token in (entry.id, entry.name):
                return [entry]
        choices = ["all"] + [family.id for family in self.families] + [entry.id for entry in self.files]
        raise ModelFileError(f"unknown model {token!r}; choose from: {', '.join(choices)} (or a file name)")


# --- the manifest -------------------------------------------------------------------------------------------------


def load_manifest(path=MANIFEST):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read the model manifest {path}: {error}") from None
    return parse_manifest(data, where=path)


def parse_manifest(data, where="manifest"):
    """A Manifest from the manifest's JSON object; every problem found is listed in one ManifestError."""
    problems = []
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{where}: not a LiteVSR model manifest (format {MANIFEST_FORMAT})")
    files = []
    for section in ("files", "adapters"):
        entries = data.get(section, [])
        if not isinstance(entries, list):
            problems.append(f"'{section}' must be a list")
            continue
        for index, raw in enumerate(entries):
            entry = _parse_file(raw, f"{section}[{index}]", problems)
            if entry is not None:
                if (section == "adapters") != (entry.role == "adapter"):
                    problems.append(f"{section}[{index}] ({entry.id}): role {entry.role!r} does not belong in "
                                    f"'{section}'")
                files.append(entry)
    families = [_parse_family(raw, f"families[{index}]", problems)
                for index, raw in enumerate(data.get("families", []))]
    families = [family for family in families if family is not None]
    _cross_check(files, families, problems)
    if problems:
        raise ManifestError(f"{where}: invalid model manifest:\n  " + "\n  ".join(problems))
    return Manifest(tuple(files), tuple(families))


def _parse_file(raw, label, problems):
    if not isinstance(raw, dict):
        problems.append(f"{label}: not an object")
        return None
    found = []
    for key, kind in (("id", str), ("role", str), ("folder", str), ("name", str), ("source", str)):
        if not isinstance(raw.get(key), kind) or not raw[key]:
            found.append(f"'{key}' missing or not a string")
    if found:
        problems.append(f"{label}: " + "; ".join(found))
        return None
    label = f"{label} ({raw['id']})"
    if raw["folder"] not in ROLES.get(raw["role"], ()):
        expected = "; ".join(f"{role} -> {' or '.join(folders)}" for role, folders in ROLES.items())
        problems.append(f"{label}: role {raw['role']!r} with folder {raw['folder']!r} (expected {expected})")
    name = raw["name"]
    if (name != os.path.basename(name) or "\\" in name or name.startswith(".")
            or not (name.endswith(SAFETENSORS) or is_pickle_name(name))):
        problems.append(f"{label}: file name {name!r} must be a plain *.safetensors (or, for a model family, "
                        f"{'/'.join(PICKLE_SUFFIXES)}) name")
    licence = raw.get("licence")
    if licence is not None and (not isinstance(licence, str) or not licence):
        problems.append(f"{label}: 'licence' must be a non-empty string or absent, not {licence!r}")
        licence = None
    source = urllib.parse.urlparse(raw["source"])
    if not (source.scheme == "https" and source.netloc or source.scheme == "http" and source.hostname in LOOPBACK):
        problems.append(f"{label}: source {raw['source']!r} is not an https URL")
    size, sha256 = raw.get("size"), raw.get("sha256")
    if size is not None and (type(size) is not int or size <= 0):
        problems.append(f"{label}: size must be a positive integer (bytes) or null, not {size!r}")
    if sha256 is not None and (not isinstance(sha256, str) or not SHA256_HEX.match(sha256)):
        problems.append(f"{label}: sha256 must be 64 lowercase hex digits or null, not {sha256!r}")
    unverified = raw.get("unverified", [])
    missing = [key for key in CHECKABLE if raw.get(key) is None]
    if not isinstance(unverified, list) or sorted(unverified) != sorted(missing):
        problems.append(f"{label}: 'unverified' must list exactly the null fields {missing}, not {unverified!r}")
    families = raw.get("families", [])
    if not isinstance(families, list) or not all(isinstance(family, str) for family in families):
        problems.append(f"{label}: 'families' must be a list of family ids")
        families = []
    if raw["role"] == "decoder" and not families:
        problems.append(f"{label}: a decoder must list the families whose latents it decodes")
    if raw["role"] == "reference" and not families:
        problems.append(f"{label}: a reference file must list the model families that use it")
    return ModelFile(raw["id"], raw["role"], raw["folder"], name, tuple(families), size, sha256, raw["source"],
                     bool(raw.get("optional", False)), tuple(missing), licence)


def _parse_family(raw, label, problems):
    if (not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not isinstance(raw.get("vae"), str)
            or not isinstance(raw.get("dits"), list) or not raw["dits"]):
        problems.append(f"{label}: needs 'id', 'vae' and a non-empty 'dits' list")
        return None
    kind, references = raw.get("kind", "backbone"), raw.get("references", [])
    if kind not in KINDS:
        problems.append(f"{label} ({raw['id']}): kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(references, list) or not all(isinstance(ref, str) for ref in references):
        problems.append(f"{label} ({raw['id']}): 'references' must be a list of file ids")
        references = []
    if kind == "backbone" and references:
        problems.append(f"{label} ({raw['id']}): a backbone family takes no reference files (a model family does)")
    return Family(raw["id"], str(raw.get("title", raw["id"])), tuple(raw["dits"]), raw["vae"],
                  bool(raw.get("default", False)), kind, tuple(references))


def _cross_check(files, families, problems):
    by_id = {}
    for entry in files:
        if entry.id in by_id:
            problems.append(f"file id {entry.id!r} appears twice")
        by_id[entry.id] = entry
    places = [(entry.folder, entry.name) for entry in files]
    for place in sorted({place for place in places if places.count(place) > 1}):
        problems.append(f"{place[0]}/{place[1]} is listed twice")
    by_family = {family.id: family for family in families}
    for family in families:
        needed = ([(dit, "dit") for dit in family.dits] + [(family.vae, "vae")]
                  + [(ref, "reference") for ref in family.references])
        for file_id, role in needed:
            entry = by_id.get(file_id)
            if entry is None or entry.role != role or family.id not in entry.families:
                problems.append(f"family {family.id!r}: {file_id!r} is not a {role} file serving this family")
    for entry in files:
        for family_id in entry.families:
            if family_id not in by_family:
                problems.append(f"{entry.id}: unknown family {family_id!r}")
            elif entry.role == "reference" and entry.id not in by_family[family_id].references:
                problems.append(f"{entry.id}: family {family_id!r} does not list this reference file")
        kinds = {by_family[family_id].kind for family_id in entry.families if family_id in by_family}
        if entry.pickle and kinds != {"model"}:
            problems.append(f"{entry.id}: a pickle ({entry.name}) may only serve model families, whose loaders read "
                            f"it weights-only; this one serves {sorted(entry.families) or 'none'}")
        if kinds == {"model"} and entry.licence is None:
            problems.append(f"{entry.id}: a file serving only model families needs its 'licence'")


# --- where files are, and whether they are intact ----------------------------------------------------------------


@dataclass(frozen=True)
class FileCheck:
    file: ModelFile
    status: str
    target: str  # where the file goes (the exact path for a missing file)
    path: str | None = None  # where it was found
    actual_size: int | None = None
    partial: int | None = None  # bytes of a resumable download in the target folder

    @property
    def usable(self):
        return self.status in PRESENT


def folder_lookup(models_dir):
    """A lookup over one models folder laid out as ComfyUI's `models/` (legacy `unet/` and `clip/` included)."""
    def lookup(folder):
        return [os.path.join(models_dir, name) for name in (folder,) + LEGACY_FOLDERS.get(folder, ())]
    return lookup


def target_folder(folder, directories):
    """Where a missing file of `folder` goes: the first directory named like the folder (ComfyUI lists the legacy
    `unet/` before `diffusion_models/`), else the first one."""
    if not directories:
        raise ModelFileError(f"ComfyUI has no folder registered for {folder!r}")
    named = [directory for directory in directories if os.path.basename(os.path.normpath(directory)) == folder]
    return os.path.abspath((named or directories)[0])


def find_file(name, directories):
    """The first `name` in the directories, top levels first, then their subfolders (as ComfyUI lists them)."""
    for directory in directories:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    for directory in directories:
        seen = set()
        for root, subdirs, files in os.walk(directory, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:
                subdirs[:] = []
                continue
            seen.add(real)
            subdirs[:] = sorted(sub for sub in subdirs if not sub.startswith("."))
            if root != directory and name in files:
                return os.path.abspath(os.path.join(root, name))
    return None


def partial_path(target_dir, name):
    return os.path.join(target_dir, f".{name}{PART_SUFFIX}")


def sha256_of(path, progress=None, chunk_size=CHUNK):
    """Hex SHA-256 of a file; progress(done, total) after every chunk (an exception from it stops hashing)."""
    digest, done, total = hashlib.sha256(), 0, os.path.getsize(path)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def check_file(entry, directories, verify_hash=False, progress=None):
    target = os.path.join(target_folder(entry.folder, directories), entry.name)
    path = find_file(entry.name, directories)
    converted = find_file(entry.converted_name, directories) if path is None and entry.pickle else None
    if converted is not None:  # the safetensors copy of a pickle: the manifest's size and hash are the pickle's
        return FileCheck(entry, CONVERTED, target, converted, os.path.getsize(converted))
    if path is None:
        part = partial_path(os.path.dirname(target), entry.name)
        return FileCheck(entry, MISSING, target, partial=os.path.getsize(part) if os.path.isfile(part) else None)
    size = os.path.getsize(path)
    if entry.size is not None and size != entry.size:
        return FileCheck(entry, WRONG_SIZE, target, path, size)
    if not verify_hash or entry.sha256 is None:
        return FileCheck(entry, UNVERIFIED if entry.size is None else OK, target, path, size)
    if sha256_of(path, progress) != entry.sha256:
        return FileCheck(entry, HASH_MISMATCH, target, path, size)
    return FileCheck(entry, VERIFIED, target, path, size)


@dataclass(frozen=True)
class Report:
    manifest: Manifest
    checks: tuple
    adapters: tuple  # (adapter folder, [*.safetensors found there]) pairs

    def of(self, file_id):
        return next(check for check in self.checks if check.file.id == file_id)

    def family_ready(self, family):
        """(ready, usable DiT check or None, VAE check): ready needs one usable DiT, the usable VAE and every
        reference file usable."""
        dit = next((self.of(dit) for dit in family.dits if self.of(dit).usable), None)
        vae = self.of(family.vae)
        references = all(self.of(ref).usable for ref in family.references)
        return dit is not None and vae.usable and references, dit, vae

    @property
    def problems(self):
        return [check for check in self.checks if check.status in (WRONG_SIZE, HASH_MISMATCH)]

    def text(self, verify_hash=False):
        return format_report(self, verify_hash)


def check(manifest, lookup, verify_hash=False, progress=None):
    """Every manifest file checked where `lookup(folder)` (a list of directories) says ComfyUI reads that folder;
    sizes always, SHA-256 too with verify_hash (minutes per file for the big DiTs). progress(entry, done, total)
    is called while hashing."""
    checks = []
    for entry in manifest.files:
        hashing = None if progress is None else (lambda done, total, entry=entry: progress(entry, done, total))
        checks.append(check_file(entry, lookup(entry.folder), verify_hash, hashing))
    adapters = []
    for directory in lookup("litevsr"):
        names = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors")) \
            if os.path.isdir(directory) else []
        adapters.append((os.path.abspath(directory), names))
    return Report(manifest, tuple(checks), tuple(adapters))


# --- the report ---------------------------------------------------------------------------------------------------


def human_size(size):
    if size is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def describe(check):
    """One file's lines: status, where it is or must go, and what to do."""
    entry = check.file
    head = f"[{check.status}] {entry.relative} ({human_size(entry.size)})" + (" optional" if entry.optional else "")
    if check.status == MISSING:
        lines = [head, f"    put it at: {check.target}", f"    download: {entry.source}"]
        if entry.sha256 is None:
            lines.append("    no published SHA-256: tools/models.py downloads it only with --allow-unverified")
        if check.partial is not None:
            lines.append(f"    a partial download ({human_size(check.partial)}) waits to be resumed at "
                         f"{partial_path(os.path.dirname(check.target), entry.name)}")
        return lines
    lines = [head, f"    found: {check.path}"]
    if check.status == CONVERTED:
        lines.append(f"    the safetensors copy of {entry.name}: the manifest's size and SHA-256 are the pickle's, so "
                     f"this copy is not checked")
    elif check.status == WRONG_SIZE:
        lines.append(f"    it has {check.actual_size} bytes, expected {entry.size}: a truncated or different file; "
                     f"delete it and download it again")
    elif check.status == HASH_MISMATCH:
        lines.append(f"    its SHA-256 is not {entry.sha256}: a corrupt or different file; delete it and download "
                     f"it again")
    elif check.status == UNVERIFIED:
        lines.append(f"    not checked: the manifest has no {' or '.join(entry.unverified)} for this file")
    return lines


def describe_model_file(check):
    """A model family's file (InfVSR): describe()'s lines with its licence and source, and for a pickle how to
    convert it once to safetensors (optional: the loaders read the pickle weights-only)."""
    entry = check.file
    head, *rest = describe(check)
    lines = [head] + ([f"    licence: {entry.licence}"] if entry.licence else []) + rest
    if check.status != MISSING:
        lines.append(f"    source: {entry.source}")
    if entry.pickle and check.status != CONVERTED:
        pickle_path = check.path or check.target
        copy = os.path.join(os.path.dirname(pickle_path), entry.converted_name)
        lines.append(f"    a PyTorch pickle, read weights-only; to convert it once (optional): {CONVERT_COMMAND} "
                     f"{pickle_path} {copy}")
    return lines


def describe_decoder(check):
    """A fast decoder's lines: describe()'s, with the backbone families whose latents it decodes after the head."""
    head, *rest = describe(check)
    return [head, f"    decodes the latents of: {', '.join(check.file.families)}"] + rest


def format_report(report, verify_hash=False):
    lines = ["LiteVSR model files" + (" (sizes and SHA-256 checked)" if verify_hash else " (sizes checked)")]
    for kind, title in (("backbone", "Backbones (one DiT + its VAE; the text encoder is optional):"),
                        ("model", "Models run as published (their DiT, VAE and reference encoder):")):
        families = [family for family in report.manifest.families if family.kind == kind]
        if families:
            lines += ["", title] + [f"  {family.title} [{family.id}]: {_family_state(report, family)}"
                                    for family in families]
    model_files = {entry.id for entry in report.manifest.files if _serves_only_models(report.manifest, entry)}
    lines += ["", "Files:"]
    for check_ in report.checks:
        if check_.file.role != "decoder" and check_.file.id not in model_files:
            lines += ["  " + line for line in describe(check_)]
    for family in (family for family in report.manifest.families if family.kind == "model"):
        lines += ["", f"{family.title} files (the VAE is listed above):"]
        for check_ in report.checks:
            if check_.file.id in model_files and family.id in check_.file.families:
                lines += ["  " + line for line in describe_model_file(check_)]
    decoders = [check_ for check_ in report.checks if check_.file.role == "decoder"]
    if decoders:
        lines += ["", "Fast decoders (optional; ComfyUI's stock Load VAE reads each from the folder shown):"]
        for check_ in decoders:
            lines += ["  " + line for line in describe_decoder(check_)]
    lines += ["", "Adapters (litevsr/):"]
    for directory, names in report.adapters:
        lines.append(f"  {directory}: " + (", ".join(names) if names else "none yet"))
    return "\n".join(lines)


def _family_state(report, family):
    ready, dit, vae = report.family_ready(family)
    if ready:
        found = [dit, vae] + [report.of(ref) for ref in family.references]
        return "READY: " + " + ".join(os.path.basename(check_.path) for check_ in found)
    names = [_accepted_names(report.manifest.file(d)) for d in family.dits]
    needs = ([] if dit else [f"a DiT ({' or '.join(names)})"]) + ([] if vae.usable else [vae.file.name]) \
        + [_accepted_names(report.of(ref).file) for ref in family.references if not report.of(ref).usable]
    return "missing " + " and ".join(needs)


def _accepted_names(entry):
    return f"{entry.name}/{SAFETENSORS}" if entry.pickle else entry.name  # the pickle or its converted copy


def _serves_only_models(manifest, entry):
    kinds = {family.kind for family in manifest.families if family.id in entry.families}
    return kinds == {"model"}
