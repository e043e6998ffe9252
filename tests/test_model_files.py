"""Model files: the real manifest, the checker, verified resumable downloads from a loopback HTTP server (Range/206,
a connection cut mid-file, a server that ignores Range), the command-line tool, and the Check Models node."""
import hashlib
import http.server
import importlib.util
import json
import os
import sys
import threading

import pytest

from tools import comfy_env
from tools import models as models_tool
from comfyui_litevsr.nodes import model_files as mf

DECODER_PUBLISHERS = ("https://huggingface.co/lightx2v/Autoencoders/resolve/main/",
                      "https://raw.githubusercontent.com/madebyollin/taehv/")
# InfVSR's files from their publishers: InfVSR's authors, RAM's (recognize-anything), SeeSR's (DAPE)
INFVSR_SOURCES = {"InfVSR.ckpt": ("https://huggingface.co/zzqingz/InfVSR/", "MIT"),
                  "ram_swin_large_14m.pth": ("https://huggingface.co/xinyu1205/recognize_anything_model/", "Apache-2.0"),
                  "DAPE.pth": ("https://huggingface.co/CSWRY/SeeSR/", "Apache-2.0")}
PAYLOAD = bytes(range(256)) * 997 + b"tail"  # 255,236 bytes: several chunks at the test chunk size
CHUNK = 16 << 10


class Server:
    """http.server on 127.0.0.1 in a thread: serves `files`, honours `Range: bytes=N-` with 206, records every
    request's headers, and can close the connection after `cut_after` bytes of a body or ignore Range."""

    def __init__(self):
        self.files, self.requests, self.cut_after, self.ignore_range = {}, [], None, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(dict(self.headers))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                sent = body[start:]
                if server.cut_after is not None:
                    sent, server.cut_after = sent[:server.cut_after], None  # one cut, then whole answers
                self.wfile.write(sent)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    served = Server()
    served.thread.start()
    try:
        yield served
    finally:
        served.httpd.shutdown()
        served.httpd.server_close()


def entry_dict(name, url, body, folder="diffusion_models", role="dit", size=True, sha256=True, **extra):
    missing = [key for key, known in (("size", size), ("sha256", sha256)) if not known]
    return {"id": name.removesuffix(".safetensors"), "role": role, "folder": folder, "name": name,
            "families": ["tiny"] if role in ("dit", "vae", "decoder") else [], "source": url,
            "size": len(body) if size else None,
            "sha256": (sha256 if isinstance(sha256, str) else hashlib.sha256(body).hexdigest()) if sha256 else None,
            "unverified": missing, **extra}


def manifest_dict(*entries, dit="tiny-dit", vae="tiny-vae"):
    return {"format": 1, "families": [{"id": "tiny", "title": "Tiny", "dits": [dit], "vae": vae, "default": True}],
            "files": list(entries), "adapters": []}


def tiny_manifest(url, dit_body=PAYLOAD, vae_body=b"vae" * 100, **dit_fields):
    return mf.parse_manifest(manifest_dict(entry_dict("tiny-dit.safetensors", url, dit_body, **dit_fields),
                                           entry_dict("tiny-vae.safetensors", url + "-vae", vae_body, "vae", "vae")))


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """ComfyUI's model folders (those the manifest uses), for this test only: empty folders under tmp_path."""
    import folder_paths

    for folder in mf.FOLDERS:
        (tmp_path / folder).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path / folder)], {".safetensors"}))
    return tmp_path


def names_in(folder):
    return sorted(os.listdir(folder)) if folder.exists() else []


def fetch(manifest, folder, **kwargs):
    return models_tool.download(manifest.file("tiny-dit"), str(folder), chunk_size=CHUNK, **kwargs)


# --- downloads ----------------------------------------------------------------------------------------------------


def test_download_verifies_and_lands_only_under_the_final_name(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    manifest = tiny_manifest(server.url("/dit"))
    seen = []

    def progress(done, total):
        seen.append((done, total))
        assert names_in(tmp_path) == [".tiny-dit.safetensors.part"]  # nothing under the final name meanwhile

    path = fetch(manifest, tmp_path, progress=progress)
    assert path == str(tmp_path / "tiny-dit.safetensors")
    assert (tmp_path / "tiny-dit.safetensors").read_bytes() == PAYLOAD
    assert names_in(tmp_path) == ["tiny-dit.safetensors"]
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) > 1
    assert "Range" not in server.requests[0]
    with pytest.raises(mf.ModelFileError, match="already exists"):
        fetch(manifest, tmp_path)


def test_cut_connection_keeps_the_part_and_the_next_call_resumes_with_range(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    server.cut_after = cut = 100_000
    manifest = tiny_manifest(server.url("/dit"))
    with pytest.raises(models_tool.DownloadInterrupted, match="resumes"):
        fetch(manifest, tmp_path)
    assert names_in(tmp_path) == [".tiny-dit.safetensors.part"]
    assert (tmp_path / ".tiny-dit.safetensors.part").read_bytes() == PAYLOAD[:cut]

    fetch(manifest, tmp_path)
    assert server.requests[-1]["Range"] == f"bytes={cut}-"
    assert (tmp_path / "tiny-dit.safetensors").read_bytes() == PAYLOAD
    assert names_in(tmp_path) == ["tiny-dit.safetensors"]


def test_an_interrupt_from_the_progress_callback_keeps_the_part(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    manifest = tiny_manifest(server.url("/dit"))

    def interrupt(done, total):
        if done > 3 * CHUNK:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(manifest, tmp_path, progress=interrupt)
    kept = (tmp_path / ".tiny-dit.safetensors.part").stat().st_size
    assert 3 * CHUNK < kept < len(PAYLOAD) and names_in(tmp_path) == [".tiny-dit.safetensors.part"]
    fetch(manifest, tmp_path)
    assert server.requests[-1]["Range"] == f"bytes={kept}-"
    assert (tmp_path / "tiny-dit.safetensors").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    (tmp_path / ".tiny-dit.safetensors.part").write_bytes(b"garbage, not the file's start")
    server.ignore_range = True
    fetch(tiny_manifest(server.url("/dit")), tmp_path)
    assert "Range" in server.requests[-1]
    assert (tmp_path / "tiny-dit.safetensors").read_bytes() == PAYLOAD


def test_wrong_hash_is_refused_and_the_part_removed(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    manifest = tiny_manifest(server.url("/dit"), sha256="0" * 64)
    with pytest.raises(models_tool.ChecksumMismatch, match="nothing was installed"):
        fetch(manifest, tmp_path)
    assert names_in(tmp_path) == []


def test_wrong_size_on_the_server_is_refused_before_downloading(server, tmp_path):
    server.files["/dit"] = PAYLOAD + b"extra"
    with pytest.raises(mf.ModelFileError, match="not the file the manifest names"):
        fetch(tiny_manifest(server.url("/dit")), tmp_path)
    assert not (tmp_path / "tiny-dit.safetensors").exists()


def test_entry_without_hash_needs_an_explicit_opt_in(server, tmp_path):
    server.files["/dit"] = PAYLOAD
    manifest = tiny_manifest(server.url("/dit"), sha256=False)
    with pytest.raises(mf.ModelFileError, match="--allow-unverified"):
        fetch(manifest, tmp_path)
    assert server.requests == [] and names_in(tmp_path) == []
    fetch(manifest, tmp_path, allow_unverified=True)
    assert (tmp_path / "tiny-dit.safetensors").read_bytes() == PAYLOAD


def test_http_error_is_reported_with_the_url(server, tmp_path):
    with pytest.raises(mf.ModelFileError, match=r"HTTP 404 .*/nowhere"):
        fetch(tiny_manifest(server.url("/nowhere")), tmp_path)


# --- the manifest -------------------------------------------------------------------------------------------------


def test_the_real_manifest_validates():
    manifest = mf.load_manifest()
    with open(mf.MANIFEST, encoding="utf-8") as handle:
        raw = json.load(handle)
    assert len(manifest.files) == len(raw["files"]) + len(raw["adapters"]) >= 8
    for entry in raw["files"] + raw["adapters"]:
        assert entry["folder"] in mf.FOLDERS
        if entry["families"] == ["infvsr"]:  # InfVSR's own files: pickles from their publishers, with a licence
            publisher, licence = INFVSR_SOURCES[entry["name"]]
            assert entry["source"].startswith(publisher) and entry["source"].endswith("/" + entry["name"])
            assert entry["licence"] == licence and entry["optional"] is False
            continue
        assert entry["name"].endswith(".safetensors")
        if entry["role"] == "decoder":  # from its publisher, optional
            assert entry["source"].startswith(DECODER_PUBLISHERS) and entry["source"].endswith("/" + entry["name"])
            assert entry["optional"] is True
        else:
            assert entry["source"].startswith("https://huggingface.co/Comfy-Org/Wan_2.")
            assert entry["source"].endswith("/" + entry["folder"] + "/" + entry["name"])
        assert entry["size"] is None or (type(entry["size"]) is int and entry["size"] > 0)
        assert entry["sha256"] is None or mf.SHA256_HEX.match(entry["sha256"])
        assert sorted(entry["unverified"]) == sorted(key for key in ("size", "sha256") if entry[key] is None)
    names = {entry.name for entry in manifest.files}
    assert {"wan2.1_t2v_1.3B_fp16.safetensors", "wan2.2_ti2v_5B_fp16.safetensors", "wan_2.1_vae.safetensors",
            "wan2.2_vae.safetensors"} <= names
    assert {family.id: family.kind for family in manifest.families} == {
        "wan2.1-t2v-1.3b": "backbone", "wan2.1-t2v-14b": "backbone", "wan2.2-ti2v-5b": "backbone", "infvsr": "model"}
    decoders = {entry.name: set(entry.families) for entry in manifest.files if entry.role == "decoder"}
    wan21 = {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b"}
    assert decoders == {"taew2_1.safetensors": wan21, "lighttaew2_1.safetensors": wan21,
                        "lightvaew2_1.safetensors": wan21, "taew2_2.safetensors": {"wan2.2-ti2v-5b"},
                        "lighttaew2_2.safetensors": {"wan2.2-ti2v-5b"}}
    assert [entry.name for entry in manifest.select()] == ["wan2.1_t2v_1.3B_fp16.safetensors",
                                                          "wan_2.1_vae.safetensors"]
    have_bf16 = manifest.select(["wan2.1-t2v-1.3b"], have=lambda file_id: file_id == "wan2.1-t2v-1.3b-bf16")
    assert [entry.id for entry in have_bf16] == ["wan2.1-t2v-1.3b-bf16", "wan2.1-vae"]  # no second DiT fetched
    assert len(manifest.select(["all", "wan2.2-vae"])) == len(manifest.files)
    with pytest.raises(mf.ModelFileError, match="unknown model 'wan3'"):
        manifest.select(["wan3"])
    infvsr = manifest.select(["infvsr"])  # the DiT, the stock Wan2.1 VAE and the reference encoder files
    assert [(entry.folder, entry.name, entry.role) for entry in infvsr] == [
        ("diffusion_models", "InfVSR.ckpt", "dit"), ("vae", "wan_2.1_vae.safetensors", "vae"),
        ("infvsr", "ram_swin_large_14m.pth", "reference"), ("infvsr", "DAPE.pth", "reference")]
    assert [entry.unverified for entry in infvsr] == [("size", "sha256"), (), (), ("size",)]


def test_pickle_suffixes_are_the_pickle_readers():
    from comfyui_litevsr.nodes.core import pickle_file

    assert mf.PICKLE_SUFFIXES == pickle_file.PICKLE_SUFFIXES


def test_infvsr_numbers_match_weights_readme():
    """Every InfVSR number in the manifest is in weights/README.md's table with its source, and a null one is said
    to be unverified there."""
    text = open(os.path.join(os.path.dirname(mf.MANIFEST), "README.md"), encoding="utf-8").read()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    for entry in mf.load_manifest().files:
        if entry.families != ("infvsr",):
            continue
        row = rows[entry.name]
        assert f"`{entry.folder}`" in row and entry.licence in row and entry.source.split("/resolve/")[0] in row
        assert (str(entry.size) if entry.size else "**null (unverified)**") in row
        assert (f"`{entry.sha256[:8]}…`" if entry.sha256 else "**null (unverified)**") in row


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(name="../evil.safetensors"), "plain"),
    (lambda e: e.update(size="12"), "positive integer"),
    (lambda e: e.update(sha256="ABC"), "64 lowercase hex"),
    (lambda e: e.update(size=None), "'unverified' must list"),
    (lambda e: e.update(source="http://example.com/x"), "https"),
    (lambda e: e.update(folder="vae"), "role 'dit' with folder 'vae'"),
    (lambda e: e.update(folder="vae_approx"), "role 'dit' with folder 'vae_approx'"),
    (lambda e: e.update(role="decoder", folder="diffusion_models"), "role 'decoder' with folder 'diffusion_models'"),
    (lambda e: e.update(role="decoder", folder="vae", families=[]), "a decoder must list the families"),
])
def test_bad_manifest_entries_are_refused_by_name(change, message):
    data = manifest_dict(entry_dict("tiny-dit.safetensors", "https://h/d", PAYLOAD),
                         entry_dict("tiny-vae.safetensors", "https://h/v", b"v", "vae", "vae"))
    change(data["files"][0])
    with pytest.raises(mf.ManifestError, match=message):
        mf.parse_manifest(data)


def model_manifest_dict():
    """The tiny backbone plus a model family `m` run as published (as InfVSR is): a pickled DiT, the backbone's
    VAE and a pickled reference file, each only m's but the VAE."""
    data = manifest_dict(
        entry_dict("tiny-dit.safetensors", "https://h/d", PAYLOAD),
        entry_dict("tiny-vae.safetensors", "https://h/v", b"v", "vae", "vae", families=["tiny", "m"]),
        entry_dict("m-dit.ckpt", "https://h/m", b"m", families=["m"], licence="MIT"),
        entry_dict("m-ref.pth", "https://h/r", b"r", "infvsr", "reference", families=["m"], licence="Apache-2.0",
                   sha256=False))
    data["families"].append({"id": "m", "title": "M", "kind": "model", "dits": ["m-dit.ckpt"], "vae": "tiny-vae",
                             "references": ["m-ref.pth"]})
    return data


def test_a_model_family_takes_pickles_and_reference_files():
    manifest = mf.parse_manifest(model_manifest_dict())
    tiny, model = manifest.families
    assert (tiny.kind, model.kind, model.references) == ("backbone", "model", ("m-ref.pth",))
    assert [entry.id for entry in manifest.select(["m"])] == ["m-dit.ckpt", "tiny-vae", "m-ref.pth"]
    assert [entry.converted_name for entry in manifest.select(["m"])] == ["m-dit.safetensors", None,
                                                                         "m-ref.safetensors"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["files"][0].update(name="tiny-dit.ckpt"), "may only serve model families"),
    (lambda d: d["files"][2].update(families=["tiny", "m"]), "may only serve model families"),
    (lambda d: d["files"][3].pop("licence"), "m-ref.pth: a file serving only model families needs its 'licence'"),
    (lambda d: d["files"][3].update(licence=""), "'licence' must be a non-empty string"),
    (lambda d: d["files"][3].update(folder="vae"), "role 'reference' with folder 'vae'"),
    (lambda d: d["files"][3].update(families=[]), "a reference file must list the model families"),
    (lambda d: d["families"][1].update(references=[]), "family 'm' does not list this reference file"),
    (lambda d: d["families"][1].update(references=["tiny-vae"]), "'tiny-vae' is not a reference file"),
    (lambda d: d["families"][0].update(references=["m-ref.pth"]), "a backbone family takes no reference files"),
    (lambda d: d["families"][1].update(kind="pipeline"), "kind 'pipeline' is not one of backbone, model"),
    (lambda d: d["files"][2].update(name="m-dit.exe"), "must be a plain"),
])
def test_bad_model_family_entries_are_refused_by_name(change, message):
    data = model_manifest_dict()
    change(data)
    with pytest.raises(mf.ManifestError, match=message):
        mf.parse_manifest(data)


def test_decoders_may_go_to_vae_or_vae_approx():
    data = manifest_dict(entry_dict("tiny-dit.safetensors", "https://h/d", PAYLOAD),
                         entry_dict("tiny-vae.safetensors", "https://h/v", b"v", "vae", "vae"),
                         entry_dict("tiny-tae.safetensors", "https://h/t", b"t", "vae", "decoder"),
                         entry_dict("tiny-lighttae.safetensors", "https://h/l", b"l", "vae_approx", "decoder"))
    manifest = mf.parse_manifest(data)
    assert [(entry.role, entry.folder) for entry in manifest.files[2:]] == [("decoder", "vae"),
                                                                            ("decoder", "vae_approx")]


def test_every_decoder_is_where_the_stock_load_vae_lists_and_reads_it(comfy_folders, monkeypatch):
    """ComfyUI's own Load VAE over a vae/ and a vae_approx/ holding each manifest decoder where the manifest puts it:
    it lists every one and opens it from exactly there (it reads vae_approx/ only for a few exact names, and lists
    there only names with a few prefixes: lighttaew2_* must go there, taew2_* and lightvaew2_1 to vae/)."""
    import comfy.utils

    stock = importlib.util.spec_from_file_location("comfyui_stock_nodes", comfy_env.comfy_dir() / "nodes.py")
    nodes = importlib.util.module_from_spec(stock)  # ComfyUI's nodes.py: here `nodes` is this repository's package
    stock.loader.exec_module(nodes)

    class Opened(Exception):
        pass

    def refuse_to_load(path, *args, **kwargs):
        raise Opened(path)

    decoders = [entry for entry in mf.load_manifest().files if entry.role == "decoder"]
    for entry in decoders:
        (comfy_folders / entry.relative).write_bytes(b"a stand-in: the loader only has to find it")
    monkeypatch.setattr(comfy.utils, "load_torch_file", refuse_to_load)
    listed = nodes.VAELoader.vae_list(nodes.VAELoader)
    for entry in decoders:
        assert entry.name in listed
        with pytest.raises(Opened) as opened:
            nodes.VAELoader().load_vae(entry.name)
        assert opened.value.args[0] == str(comfy_folders / entry.relative)


# --- the checker --------------------------------------------------------------------------------------------------


def test_checker_reports_present_missing_wrong_size_and_hash(tmp_path):
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    (models / "unet" / "tiny-dit.safetensors").write_bytes(PAYLOAD)  # legacy folder, as ComfyUI reads it
    manifest = tiny_manifest("https://h/d")
    lookup = mf.folder_lookup(str(models))

    report = mf.check(manifest, lookup)
    dit, vae = report.of("tiny-dit"), report.of("tiny-vae")
    assert (dit.status, dit.path) == (mf.OK, str(models / "unet" / "tiny-dit.safetensors"))
    assert (vae.status, vae.target) == (mf.MISSING, str(models / "vae" / "tiny-vae.safetensors"))
    assert report.family_ready(manifest.families[0])[0] is False
    assert str(models / "vae" / "tiny-vae.safetensors") in report.text()

    (models / "vae").mkdir()
    (models / "vae" / ".tiny-vae.safetensors.part").write_bytes(b"vae")
    assert mf.check(manifest, lookup).of("tiny-vae").partial == 3
    (models / "vae" / "sub").mkdir()
    (models / "vae" / "sub" / "tiny-vae.safetensors").write_bytes(b"vae" * 99)  # in a subfolder, too short
    report = mf.check(manifest, lookup)
    assert report.of("tiny-vae").status == mf.WRONG_SIZE and report.problems == [report.of("tiny-vae")]
    assert "delete it and download it again" in report.text()

    (models / "vae" / "sub" / "tiny-vae.safetensors").write_bytes(b"vae" * 100)
    report = mf.check(manifest, lookup, verify_hash=True)
    assert report.of("tiny-dit").status == report.of("tiny-vae").status == mf.VERIFIED
    assert report.family_ready(manifest.families[0])[0] and "READY" in report.text()

    (models / "unet" / "tiny-dit.safetensors").write_bytes(bytes(len(PAYLOAD)))  # right size, wrong content
    assert mf.check(manifest, lookup).of("tiny-dit").status == mf.OK
    assert mf.check(manifest, lookup, verify_hash=True).of("tiny-dit").status == mf.HASH_MISMATCH
    unsized = tiny_manifest("https://h/d", size=False)
    assert mf.check(unsized, lookup).of("tiny-dit").status == mf.UNVERIFIED


def test_checker_takes_a_converted_pickle_and_needs_the_reference_files(tmp_path):
    models = tmp_path / "models"
    manifest = mf.parse_manifest(model_manifest_dict())
    lookup = mf.folder_lookup(str(models))
    for folder in ("diffusion_models", "vae", "infvsr"):
        (models / folder).mkdir(parents=True)
    (models / "vae" / "tiny-vae.safetensors").write_bytes(b"v")
    (models / "diffusion_models" / "m-dit.ckpt").write_bytes(b"m")
    model = manifest.families[1]
    report = mf.check(manifest, lookup)
    assert report.family_ready(model)[0] is False
    text = report.text()
    assert "M [m]: missing m-ref.pth/.safetensors" in text and "Models run as published" in text
    assert f"put it at: {models / 'infvsr' / 'm-ref.pth'}" in text
    assert (f"python -m tools.infvsr convert {models / 'diffusion_models' / 'm-dit.ckpt'} "
            f"{models / 'diffusion_models' / 'm-dit.safetensors'}") in text
    assert "no published SHA-256: tools/models.py downloads it only with --allow-unverified" in text  # m-ref

    (models / "diffusion_models" / "m-dit.ckpt").unlink()  # converted, the pickle deleted
    (models / "diffusion_models" / "m-dit.safetensors").write_bytes(b"a safetensors copy, other bytes")
    (models / "infvsr" / "m-ref.pth").write_bytes(b"r")
    report = mf.check(manifest, lookup, verify_hash=True)
    assert report.of("m-dit.ckpt").status == mf.CONVERTED and report.of("m-ref.pth").status == mf.OK
    assert report.problems == [] and report.family_ready(model)[0]
    text = report.text()
    assert "M [m]: READY: m-dit.safetensors + tiny-vae.safetensors + m-ref.pth" in text
    assert "[converted] diffusion_models/m-dit.ckpt" in text and "licence: MIT" in text
    assert "source: https://h/r" in text


# --- the tool and the node ----------------------------------------------------------------------------------------


def test_tool_downloads_the_default_family_and_reports(server, tmp_path, capsys):
    server.files["/dit"], server.files["/dit-vae"], server.files["/tae"] = PAYLOAD, b"vae" * 100, b"tae" * 50
    manifest_path = tmp_path / "models.json"
    manifest_path.write_text(json.dumps(manifest_dict(
        entry_dict("tiny-dit.safetensors", server.url("/dit"), PAYLOAD),
        entry_dict("tiny-vae.safetensors", server.url("/dit-vae"), b"vae" * 100, "vae", "vae"),
        entry_dict("lighttae-tiny.safetensors", server.url("/tae"), b"tae" * 50, "vae_approx", "decoder",
                   optional=True))))
    models = tmp_path / "models"
    argv = ["--models-dir", str(models), "--manifest", str(manifest_path)]
    assert models_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "[missing]" in out and f"put it at: {models / 'vae_approx' / 'lighttae-tiny.safetensors'}" in out
    assert models_tool.main(argv + ["--download"]) == 0
    assert (models / "diffusion_models" / "tiny-dit.safetensors").read_bytes() == PAYLOAD
    assert (models / "vae" / "tiny-vae.safetensors").read_bytes() == b"vae" * 100
    assert not (models / "vae_approx").exists()  # an optional decoder is fetched only when asked for
    assert models_tool.main(argv + ["--verify-hash"]) == 0  # ... and its absence is no failure
    assert "Tiny [tiny]: READY" in capsys.readouterr().out
    assert models_tool.main(argv + ["--download", "--only", "lighttae-tiny"]) == 0
    assert (models / "vae_approx" / "lighttae-tiny.safetensors").read_bytes() == b"tae" * 50


@pytest.mark.usefixtures("comfy_folders")
def test_node_report_names_the_exact_target_folder(tmp_path, monkeypatch):
    import folder_paths
    from comfyui_litevsr.nodes.model_check_nodes import LiteVSRCheckModels

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(tmp_path / "unet"), str(tmp_path / "diffusion_models")], {".safetensors"}))
    (tmp_path / "vae" / "wan_2.1_vae.safetensors").write_bytes(b"not the VAE")
    output = LiteVSRCheckModels.execute(False)
    report = output.result[0]
    assert output.ui.as_dict() == {"text": (report,)}
    assert f"put it at: {tmp_path / 'diffusion_models' / 'wan2.1_t2v_1.3B_fp16.safetensors'}" in report
    assert f"put it at: {tmp_path / 'vae' / 'wan2.2_vae.safetensors'}" in report
    assert "[wrong-size] vae/wan_2.1_vae.safetensors" in report
    assert f"{tmp_path / 'litevsr'}: none yet" in report
    infvsr = report.split("\nInfVSR (one-step, causal streaming) files", 1)[1].split("\n\n", 1)[0].splitlines()
    assert infvsr[1:5] == ["  [missing] diffusion_models/InfVSR.ckpt (size unknown)", "      licence: MIT",
                           f"      put it at: {tmp_path / 'diffusion_models' / 'InfVSR.ckpt'}",
                           "      download: https://huggingface.co/zzqingz/InfVSR/resolve/main/InfVSR.ckpt"]
    assert f"      put it at: {tmp_path / 'infvsr' / 'ram_swin_large_14m.pth'}" in infvsr
    assert "      licence: Apache-2.0" in infvsr and "[missing] infvsr/DAPE.pth (size unknown)" in "\n".join(infvsr)
    assert (f"python -m tools.infvsr convert {tmp_path / 'infvsr' / 'DAPE.pth'} "
            f"{tmp_path / 'infvsr' / 'DAPE.safetensors'}") in "\n".join(infvsr)

    with open(tmp_path / "vae" / "wan_2.1_vae.safetensors", "r+b") as handle:  # right size (sparse), wrong bytes
        handle.truncate(mf.load_manifest().file("wan2.1-vae").size)
    assert "[ok] vae/wan_2.1_vae.safetensors" in LiteVSRCheckModels.execute(False).result[0]
    assert "[hash-mismatch] vae/wan_2.1_vae.safetensors" in LiteVSRCheckModels.execute(True).result[0]


@pytest.mark.usefixtures("comfy_folders")
def test_node_reports_the_optional_fast_decoders_and_finds_one_in_vae_approx(tmp_path):
    from comfyui_litevsr.nodes.model_check_nodes import LiteVSRCheckModels

    lighttae = tmp_path / "vae_approx" / "lighttaew2_1.safetensors"
    with open(lighttae, "wb") as handle:  # the manifest's size (sparse)
        handle.truncate(mf.load_manifest().file("lighttaew2.1").size)
    report = LiteVSRCheckModels.execute(False).result[0]
    backbones, decoders = report.split("\nFast decoders (optional", 1)
    lines = decoders.splitlines()
    found = lines.index("  [ok] vae_approx/lighttaew2_1.safetensors (45.27 MB) optional")
    assert lines[found + 1:found + 3] == ["      decodes the latents of: wan2.1-t2v-1.3b, wan2.1-t2v-14b",
                                          f"      found: {lighttae}"]
    missing = lines.index("  [missing] vae/taew2_1.safetensors (22.64 MB) optional")
    assert lines[missing + 2] == f"      put it at: {tmp_path / 'vae' / 'taew2_1.safetensors'}"
    assert "taew2_1" not in backbones


@pytest.mark.usefixtures("comfy_folders")
def test_node_says_in_one_line_when_this_comfyui_cannot_load_tiny_decoders(monkeypatch):
    from comfyui_litevsr.nodes.model_check_nodes import LiteVSRCheckModels

    assert "cannot load tiny Wan decoders" not in LiteVSRCheckModels.execute(False).result[0]
    monkeypatch.setitem(sys.modules, "comfy.taesd.taehv", None)  # as on a ComfyUI without comfy/taesd/taehv.py
    last = LiteVSRCheckModels.execute(False).result[0].splitlines()[-1]
    assert "cannot load tiny Wan decoders" in last and "update ComfyUI" in last
