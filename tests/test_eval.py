"""The quality harness (bench/eval.py): the sanity row against the reference numbers, the metrics on cases with a
known answer, the lossless LR hand-off to LiteVSR, and one end-to-end run with stand-ins in a subprocess."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tools import demo
from bench import eval as eval_tool
from comfyui_litevsr.nodes.core.video_io import VideoReader
from conftest import REPO


@pytest.fixture(scope="module")
def bunny_frames():
    """Frames 56..64 of bigbuckbunny (1280x720), RGB uint8."""
    return eval_tool.to_uint8(VideoReader(demo.bigbuckbunny()).frames(56, 9))


def test_sanity_row_reproduces_the_reference_numbers():
    measured = eval_tool.sanity_row(eval_tool.NcnnUpscaler(*eval_tool.SPAN_MODEL))
    assert measured["bicubic"][0] == pytest.approx(30.41, abs=0.05)
    assert measured["bicubic"][1] == pytest.approx(0.838, abs=0.005)
    assert measured["SPAN x4"][0] == pytest.approx(32.35, abs=0.05)
    assert measured["SPAN x4"][1] == pytest.approx(0.893, abs=0.005)
    assert eval_tool.sanity_problems(measured) == []


def test_sanity_problems_name_the_expected_value():
    measured = {"bicubic": (30.41, 0.838), "SPAN x4": (32.29, 0.893)}
    assert eval_tool.sanity_problems(measured) == ["SPAN x4 PSNR 32.29 dB, expected 32.35 +- 0.05 dB"]


def test_psnr_ssim_of_identical_and_offset_frames(bunny_frames):
    frame = bunny_frames[0]
    with np.errstate(divide="ignore"):
        assert eval_tool.psnr(frame, frame) == float("inf")
    assert eval_tool.ssim(frame, frame) == pytest.approx(1.0)
    flat = np.full((64, 64, 3), 100, np.uint8)
    assert eval_tool.psnr(flat, flat + 1) == pytest.approx(20 * np.log10(255), abs=1e-6)  # MSE 1
    assert eval_tool.ssim(frame, bunny_frames[1]) < 1


def test_warping_error_static_flicker_and_motion(bunny_frames):
    static = np.stack([bunny_frames[4]] * 4)
    motions = eval_tool.gt_motions(static)
    assert eval_tool.warping_error(static, motions) == 0.0
    flicker = static.astype(np.int16)
    flicker[1::2] += 12
    flicker = np.clip(flicker, 0, 255).astype(np.uint8)
    assert 120 < eval_tool.warping_error(flicker, motions) <= 144  # 12 ** 2, less where 255 clips
    # A camera pan of 3 px a frame: the GT's own motion explains it; assuming none does not.
    pan = np.stack([bunny_frames[4][100:400, 10 + 3 * i:610 + 3 * i] for i in range(5)])
    assert eval_tool.warping_error(pan, eval_tool.gt_motions(pan)) < 0.5
    assert eval_tool.warping_error(pan, eval_tool.gt_motions(np.stack([pan[0]] * 5))) > 50
    # The real clip: its own warping error is small next to the same clip with flicker added.
    real_motions = eval_tool.gt_motions(bunny_frames)
    own = eval_tool.warping_error(bunny_frames, real_motions)
    flickering = bunny_frames.astype(np.int16)
    flickering[1::2] += 12
    assert own < 20 < eval_tool.warping_error(np.clip(flickering, 0, 255).astype(np.uint8), real_motions)
    assert eval_tool.warping_error(bunny_frames[:1], real_motions[:0]) is None


def test_no_reference_metrics_rank_gt_above_bicubic(bunny_frames):
    gt = bunny_frames[4]
    bicubic = eval_tool.bicubic_up(eval_tool.bicubic_down(gt))
    assert eval_tool.niqe(gt) < eval_tool.niqe(bicubic)
    assert eval_tool.niqe(gt[:192]) is None  # scikit-video's NIQE needs more than 192 px
    if eval_tool.brisque_available():
        assert eval_tool.brisque(gt) < eval_tool.brisque(bicubic)
    assert not hasattr(np, "int")  # the scikit-video shims are gone again


def test_lossless_hand_off_is_bit_exact(tmp_path, bunny_frames):
    rng = np.random.default_rng(0)
    for name, frames in (("noise", rng.integers(0, 256, (5, 45, 80, 3), dtype=np.uint8)),
                         ("bunny", np.stack([eval_tool.bicubic_down(frame) for frame in bunny_frames]))):
        path = eval_tool.write_lossless(frames, tmp_path / f"{name}.mkv", 25)
        reader = VideoReader(path)
        assert (reader.frame_count, reader.fps) == (len(frames), 25)
        assert np.array_equal(eval_tool.to_uint8(reader.frames(0, len(frames))), frames)


def test_windows_and_crops():
    for window in range(1, 12):
        for count in range(1, window + 1):
            offset, taken = eval_tool.centred(window, count)
            assert taken == count and 0 <= offset <= window // 2 < offset + count <= window
    frames = np.zeros((2, 210, 354, 3), np.uint8)
    frames[:, 1:209, 1:353] = 1
    cropped = eval_tool.crop_to_multiple(frames, 4)
    assert cropped.shape == (2, 208, 352, 3) and cropped.min() == 1


def test_failed_sanity_row_stops_with_the_expected_values(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_tool, "SANITY_EXPECTED", {"bicubic": (31.0, 0.838), "SPAN x4": (32.35, 0.893)})
    assert eval_tool.main(["--out", str(tmp_path)]) == 1
    assert "bicubic PSNR 30.41 dB, expected 31.00 +- 0.05 dB" in capsys.readouterr().err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["clips"] == [] and report["sanity"]["problems"]
    assert "Sanity FAILED" in (tmp_path / "eval.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eval_end_to_end_with_stand_ins(tmp_path):
    # 354x210: not a multiple of 4 (centre-cropped to 352x208), still over NIQE's 192 px
    clip = demo.make_clip(demo.bigbuckbunny(), tmp_path / "small.mp4", 5, 354, 210)
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "bench.eval", "--clips", str(clip), "--start", "0", "--frames",
               "5", "--realesrgan-frames", "1", "--litevsr-frames", "5", "--steps", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    assert done.stdout.count(eval_tool.STAND_IN_BANNER) == 2  # before and after the run
    assert "centre-cropped to 352x208" in done.stdout

    report = json.loads((out / "eval.json").read_text())
    assert report["stand_ins"] and report["git"]["commit"] and report["machine"]["cpu"]
    assert "-m bench.eval" in report["command"]
    assert report["sanity"]["problems"] == []
    assert report["sanity"]["measured"]["SPAN x4"][0] == pytest.approx(32.35, abs=0.05)
    (clip_report,) = report["clips"]
    assert clip_report["size"] == [352, 208] and clip_report["lr_size"] == [88, 52]
    rows = {row["method"]: row for row in clip_report["rows"]}
    litevsr = "LiteVSR 1 step (stand-ins)"
    assert list(rows) == ["GT", "bicubic", "SPAN x4", "Real-ESRGAN x4plus", litevsr]
    expected_frames = {"GT": [0, 4], "bicubic": [0, 4], "SPAN x4": [0, 4], "Real-ESRGAN x4plus": [2, 2],
                       litevsr: [0, 4]}
    for method, row in rows.items():
        assert row["frames"] == expected_frames[method] and row["size"] == [352, 208], method
        assert row["niqe"] is not None and (row["brisque"] is not None) == eval_tool.brisque_available()
        if method != "GT":
            assert len(row["per_frame"]["psnr"]) == row["frames"][1] - row["frames"][0] + 1
            assert row["seconds_per_frame"] > 0
    assert rows["Real-ESRGAN x4plus"]["warping_error"] is None  # one frame
    assert rows[litevsr]["warping_error"] is not None and rows[litevsr]["note"] == eval_tool.STAND_IN_NOTE
    assert rows["SPAN x4"]["psnr"] > rows["bicubic"]["psnr"]

    markdown = (out / "eval.md").read_text()
    assert eval_tool.STAND_IN_BANNER in markdown and eval_tool.STAND_IN_NOTE in markdown
    assert f"| {litevsr} | 0..4 |" in markdown and "| bicubic | 30.41 | 0.838 |" in markdown
    crop = out / clip_report["crop"]["file"]
    assert crop.name == "small_frame002_crop.png" and 0 < crop.stat().st_size < 1_000_000
    assert sorted(p.name for p in out.iterdir()) == sorted(["eval.json", "eval.md", crop.name])


def test_models_dir_rows_use_its_files_and_name_the_missing_ones(tmp_path):
    args = eval_tool.parse_args(["--models-dir", str(tmp_path), "--steps", "1,4"])
    with pytest.raises(FileNotFoundError, match="MODELS_DIR lacks .*diffusion_models.* and .*vae"):
        eval_tool.litevsr_settings(args)
    for folder, name in (("diffusion_models", demo.DIT_NAME), ("vae", demo.VAE_NAME)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    runs, models = eval_tool.litevsr_settings(args)
    assert list(runs) == ["LiteVSR 1 step", "LiteVSR 4 steps"]
    frames, model_args, steps, note = runs["LiteVSR 4 steps"]
    assert model_args == ["--dit", str(tmp_path / "diffusion_models" / demo.DIT_NAME),
                          "--vae", str(tmp_path / "vae" / demo.VAE_NAME)] and steps == 4
    assert note == "new zero-init adapter (bare backbone)" and demo.DIT_NAME in models
