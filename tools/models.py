"""Check, and optionally download, the model files LiteVSR supports (weights/models.json) in a ComfyUI models folder.

    python -m tools.models --models-dir ComfyUI/models                     # report: present, missing, where each goes
    python -m tools.models --models-dir ComfyUI/models --verify-hash       # also compare SHA-256 (reads every file)
    python -m tools.models --models-dir ComfyUI/models --download          # fetch what the default backbone misses
    python -m tools.models --models-dir ComfyUI/models --download --only wan2.2-ti2v-5b,umt5-xxl-fp8-scaled

The models folder holds diffusion_models/, vae/, vae_approx/, text_encoders/, litevsr/ and infvsr/ (ComfyUI's legacy
unet/ and clip/ are searched too). --only takes file ids, file names, family ids (its preferred DiT + its VAE, and a
model family's reference files: `infvsr` is InfVSR.ckpt, the Wan2.1 VAE, RAM and DAPE) or "all"; without it the
default family (Wan2.1 T2V 1.3B) is fetched. The optional fast decoders (taew2.1, lighttaew2.1, ...) are fetched only
when named or with "all"; each goes to the folder the stock Load VAE reads it from. A download goes to a hidden
`.<name>.part` beside the final file, resumes from there when run again (HTTP Range), and is renamed to its final
name only when its SHA-256 matches the manifest; a file without a SHA-256 in the manifest (InfVSR.ckpt for now) is
refused unless --allow-unverified. Standard library only: no ComfyUI import, any Python 3.10+ runs it.
"""
import argparse
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tools import comfy_env

comfy_env.import_pack()
from comfyui_litevsr.nodes import model_files  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LiteVSR: check / download the supported model files")
    ap.add_argument("--models-dir", required=True, help="ComfyUI's models folder (diffusion_models/, vae/, ...)")
    ap.add_argument("--download", action="store_true", help="download the selected files that are missing")
    ap.add_argument("--only", default="", help="comma-separated file ids, file names, family ids or 'all' "
                                               "(default: the default backbone family)")
    ap.add_argument("--verify-hash", action="store_true", help="also compare the SHA-256 of present files")
    ap.add_argument("--allow-unverified", action="store_true",
                    help="download files the manifest has no SHA-256 for (they cannot be verified)")
    ap.add_argument("--manifest", default=model_files.MANIFEST, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Progress:
    """One line per file, rewritten in place on a terminal, a line every 10 % otherwise."""

    def __init__(self, label, stream=sys.stdout):
        self.label, self.stream, self.tty = label, stream, stream.isatty()
        self.started, self.last = time.monotonic(), -1

    def __call__(self, done, total):
        percent = int(100 * done / total) if total else None
        step = percent if self.tty else (percent // 10 if percent is not None else done >> 30)
        if step == self.last:
            return
        self.last = step
        rate = done / max(time.monotonic() - self.started, 1e-6) / 1e6
        shown = f"{percent:3d} %" if percent is not None else model_files.human_size(done)
        text = f"  {self.label}: {shown} of {model_files.human_size(total)} ({rate:.1f} MB/s)"
        self.stream.write(("\r" + text) if self.tty else text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


# --- downloads ----------------------------------------------------------------------------------------------------

USER_AGENT = "ComfyUI-LiteVSR-models/1"


class DownloadInterrupted(model_files.ModelFileError):
    """The transfer stopped early; the partial file is kept and the next download resumes from it."""


class ChecksumMismatch(model_files.ModelFileError):
    """The downloaded bytes are not the file the manifest names; the partial file was deleted."""


class _Partial:
    """The open `.part` file and the running SHA-256 of its contents."""

    def __init__(self, path):
        self.path = path
        self.handle = open(path, "a+b")  # closed by download()
        _lock(self.handle, path)
        self.restart_digest()
        self.handle.seek(0)
        while chunk := self.handle.read(model_files.CHUNK):
            self.digest.update(chunk)
        self.size = self.handle.tell()

    def restart_digest(self):
        self.digest = hashlib.sha256()

    def truncate(self):
        self.handle.seek(0)
        self.handle.truncate()
        self.restart_digest()
        self.size = 0

    def append(self, chunk):
        self.handle.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)


def _lock(handle, path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise model_files.ModelFileError(f"another download is writing {path}; wait for it to finish") from None


def download(entry, target_dir, allow_unverified=False, progress=None, timeout=60.0, chunk_size=model_files.CHUNK):
    """Downloads `entry` into target_dir and returns the final path. The bytes go to `.<name>.part` (an existing
    one is resumed with `Range: bytes=<size>-`), and are renamed to the final name only when size and SHA-256 match
    the manifest. progress(done, total) after every chunk; an exception raised by it (an interrupt) stops the
    download and keeps the partial file, as a broken connection does (DownloadInterrupted). A wrong hash deletes
    the partial file (ChecksumMismatch). An entry without a SHA-256 is refused unless allow_unverified."""
    if entry.sha256 is None and not allow_unverified:
        raise model_files.ModelFileError(f"{entry.name}: the manifest has no SHA-256 for this file, so a download "
                                         f"could not be verified; refusing it (tools/models.py --allow-unverified "
                                         f"downloads it anyway)")
    os.makedirs(target_dir, exist_ok=True)
    final = os.path.join(target_dir, entry.name)
    if os.path.lexists(final):
        raise model_files.ModelFileError(f"{final} already exists; not overwriting it (delete it first to download "
                                         f"it again)")
    partial = _Partial(model_files.partial_path(target_dir, entry.name))
    try:
        if entry.size is not None and partial.size > entry.size:
            partial.truncate()
        if entry.size is None or partial.size < entry.size:
            _transfer(entry, partial, progress, timeout, chunk_size)
        partial.handle.flush()
        os.fsync(partial.handle.fileno())
    finally:
        partial.handle.close()
    _finish(entry, partial, final)
    return final


def _transfer(entry, partial, progress, timeout, chunk_size):
    offset = partial.size
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(entry.source, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset and entry.size is None:
            return  # the partial file already holds everything the server has; the hash decides
        if error.code == 416 and offset:
            partial.truncate()
            raise model_files.ModelFileError(f"{entry.name}: the server refused to resume at byte {offset}; the "
                                             f"partial download was discarded, run again to start over") from None
        raise model_files.ModelFileError(
            f"{entry.name}: HTTP {error.code} {error.reason} from {entry.source}") from None
    except (urllib.error.URLError, OSError) as error:
        raise DownloadInterrupted(f"{entry.name}: cannot reach {entry.source}: {getattr(error, 'reason', error)}"
                                  + _kept(partial)) from None
    with response:
        if response.status == 200 and offset:
            partial.truncate()  # the server ignored the Range request: start over
        elif response.status == 206 and _range_start(response.headers.get("Content-Range")) != offset:
            raise model_files.ModelFileError(f"{entry.name}: the server answered the resume at byte {offset} with "
                                             f"{response.headers.get('Content-Range')!r}")
        elif response.status not in (200, 206):
            raise model_files.ModelFileError(f"{entry.name}: unexpected HTTP {response.status} from {entry.source}")
        length = response.headers.get("Content-Length")
        end = partial.size + int(length) if length is not None else entry.size
        if entry.size is not None and end is not None and end != entry.size:
            raise model_files.ModelFileError(f"{entry.name}: the server offers {end} bytes, the manifest expects "
                                             f"{entry.size}: not the file the manifest names")
        try:
            while chunk := response.read(chunk_size):
                partial.append(chunk)
                if progress is not None:
                    progress(partial.size, end)
        except (OSError, ValueError, EOFError) as error:  # reset, timeout, http.client.IncompleteRead
            raise DownloadInterrupted(f"{entry.name}: the connection broke after {partial.size} of {end} bytes "
                                      f"({type(error).__name__})" + _kept(partial)) from None
    if end is not None and partial.size < end:
        raise DownloadInterrupted(f"{entry.name}: the connection closed after {partial.size} of {end} bytes"
                                  + _kept(partial))


def _finish(entry, partial, final):
    if entry.size is not None and partial.size != entry.size:
        raise DownloadInterrupted(f"{entry.name}: {partial.size} of {entry.size} bytes" + _kept(partial))
    if entry.sha256 is not None and partial.digest.hexdigest() != entry.sha256:
        os.remove(partial.path)
        raise ChecksumMismatch(f"{entry.name}: downloaded SHA-256 {partial.digest.hexdigest()} is not the "
                               f"manifest's {entry.sha256}; the download was deleted, nothing was installed")
    os.chmod(partial.path, 0o644)
    os.replace(partial.path, final)


def _kept(partial):
    return f"; the partial download stays in {partial.path} and the next run resumes from there"


def _range_start(content_range):
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def download_missing(report, selected, allow_unverified):
    """Downloads the selected files that are missing; returns the number that failed."""
    failures = 0
    for entry in selected:
        state = report.of(entry.id)
        if state.usable:
            continue
        if state.status != model_files.MISSING:
            print(f"not downloading {entry.name}: {state.path} is there but {state.status}; delete it first")
            failures += 1
            continue
        print(f"downloading {entry.relative} ({model_files.human_size(entry.size)}) from {entry.source}")
        progress = Progress(entry.name)
        try:
            path = download(entry, str(Path(state.target).parent), allow_unverified, progress)
        except model_files.ModelFileError as error:
            progress.close()
            print(f"FAILED: {error}")
            failures += 1
            continue
        progress.close()
        print(f"  installed {path}" + ("" if entry.sha256 else " (UNVERIFIED: the manifest has no SHA-256)"))
    return failures


def main(argv=None):
    args = parse_args(argv)
    lookup = model_files.folder_lookup(str(Path(args.models_dir).resolve()))
    try:
        manifest = model_files.load_manifest(args.manifest)
        report = model_files.check(manifest, lookup, args.verify_hash)
        selected = manifest.select([token for token in args.only.split(",") if token.strip()],
                                   have=lambda file_id: report.of(file_id).usable)
    except model_files.ModelFileError as error:
        print(error, file=sys.stderr)
        return 2
    print(report.text(args.verify_hash))
    if not args.download:
        return 1 if report.problems else 0
    wanted = ", ".join(entry.name for entry in selected)
    print(f"\nselected for download: {wanted}")
    try:
        failures = download_missing(report, selected, args.allow_unverified)
    except KeyboardInterrupt:
        print("\ninterrupted: the partial download is kept; run the same command again to resume")
        return 130
    print("done" if not failures else f"{failures} file(s) not installed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
