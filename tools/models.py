"""Check, and optionally download, the model files LiteVSR supports (weights/models.json) in a ComfyUI models folder.

    python -m tools.models --models-dir ComfyUI/models                     # report: present, missing, where each goes
    python -m tools.models --models-dir ComfyUI/models --verify-hash       # also compare SHA-256 (reads every file)
    python -m tools.models --models-dir ComfyUI/models --download          # fetch what the default backbone misses
    python -m tools.models --models-dir ComfyUI/models --download --only wan2.2-ti2v-5b,umt5-xxl-fp8-scaled

The models folder holds diffusion_models/, vae/, text_encoders/ and litevsr/ (ComfyUI's legacy unet/ and clip/ are
searched too). --only takes file ids, file names, backbone family ids (its preferred DiT + its VAE) or "all";
without it the default family (Wan2.1 T2V 1.3B) is fetched. A download goes to a hidden `.<name>.part` beside the
final file, resumes from there when run again (HTTP Range), and is renamed to its final name only when its SHA-256
matches the manifest; a file without a SHA-256 in the manifest is refused unless --allow-unverified. Standard
library only: no ComfyUI import, any Python 3.10+ runs it.
"""
import argparse
import sys
import time
from pathlib import Path

from tools import comfy_env

comfy_env.import_pack()
from comfyui_litevsr.nodes.core import model_files  # noqa: E402


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
            path = model_files.download(entry, str(Path(state.target).parent), allow_unverified, progress)
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
