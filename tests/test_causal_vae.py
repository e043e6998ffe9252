"""The Wan2.1 VAE streamed chunk by chunk with its causal cache carried (nodes/causal_vae.py) against ComfyUI's own
VAE.encode / VAE.decode of the whole clip, on whichever ComfyUI runs the suite (its stepping is read from its loops).

Each chunk's result is bit for bit ComfyUI's result for the clip that ends with that chunk. Against the whole clip it
is bit for bit too, except on ComfyUI 0.33 for the last latent of a chunk that ends inside one of its latent pairs
(and that latent's 4 decoded frames): there ComfyUI itself codes the latent alone when the clip ends at it and with
its partner otherwise, the same sums in another order, so the two differ by float32 rounding (about 1e-6 measured,
LOOK_AHEAD_TOLERANCE allows 1e-5).
"""
import comfy.ldm.wan.vae as wan_vae
import comfy.sd
import pytest
import torch

from comfyui_litevsr.nodes.causal_vae import CausalVAEStream
from comfyui_litevsr.nodes.wan_vae_steps import read_stepping
from tools import tiny_models

CHUNKINGS = [(9, 12, 12), (9, 12, 4), (1, 4, 4, 4, 4), (5, 8)]  # pixel frames: InfVSR's 9|12|..., a short last one
LOOK_AHEAD_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def clip(sample_clip_frames):
    """Real content, 33 frames at 64x36: VAE.encode crops the height to 32, the stream must do the same."""
    return sample_clip_frames


def latent_counts(chunking):
    first, *later = chunking
    return [(first + 3) // 4] + [frames // 4 for frames in later]


def chunk_end_latents(counts):
    """The position of each chunk's last latent."""
    return [sum(counts[:i + 1]) - 1 for i in range(len(counts))]


def frames_of(latents):
    """The pixel frames decoded from these latent positions: latent 0 gives frame 0, latent n frames 4n-3..4n."""
    return [frame for n in latents for frame in range(max(0, 4 * n - 3), 4 * n + 1)]


def assert_whole_clip(got, whole, dim, look_ahead):
    """Bit for bit along `dim`, within LOOK_AHEAD_TOLERANCE at the `look_ahead` positions (see the module doc)."""
    assert got.shape == whole.shape
    exact = torch.tensor([i for i in range(got.shape[dim]) if i not in look_ahead], dtype=torch.long)
    assert torch.equal(got.index_select(dim, exact), whole.index_select(dim, exact))
    torch.testing.assert_close(got, whole, atol=LOOK_AHEAD_TOLERANCE, rtol=0)


def encode_chunks(stream, frames, chunking):
    starts = [sum(chunking[:i]) for i in range(len(chunking))]
    return [stream.encode(frames[start:start + size]) for start, size in zip(starts, chunking)]


def decode_chunks(stream, latent, counts):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [stream.decode(latent[:, :, start:start + count]) for start, count in zip(starts, counts)]


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: "|".join(map(str, c)))
def test_chunked_encode_is_comfyuis_encode_of_the_clip(tiny_vae, clip, chunking):
    frames = clip[:sum(chunking)]
    chunks = encode_chunks(CausalVAEStream(tiny_vae), frames, chunking)
    ends = [sum(chunking[:i + 1]) for i in range(len(chunking))]
    done = 0
    for chunk, end in zip(chunks, ends):  # each chunk: exactly ComfyUI's encode of the clip ending there
        assert torch.equal(chunk, tiny_vae.encode(frames[:end])[:, :, done:])
        done += chunk.shape[2]
    assert chunks[0].shape[1:] == (16, latent_counts(chunking)[0], 4, 8)
    assert_whole_clip(torch.cat(chunks, 2), tiny_vae.encode(frames), 2, chunk_end_latents(latent_counts(chunking)))


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: "|".join(map(str, c)))
def test_chunked_decode_is_comfyuis_decode_of_the_latent(tiny_vae, clip, chunking):
    latent = tiny_vae.encode(clip[:sum(chunking)])
    counts = latent_counts(chunking)
    chunks = decode_chunks(CausalVAEStream(tiny_vae), latent, counts)
    done = 0
    for chunk, end in zip(chunks, [sum(counts[:i + 1]) for i in range(len(counts))]):
        assert torch.equal(chunk, tiny_vae.decode(latent[:, :, :end])[0][done:])
        done += chunk.shape[0]
    assert [chunk.shape[0] for chunk in chunks] == list(chunking)
    assert chunks[0].dtype == torch.float32 and chunks[0].device.type == "cpu"
    assert_whole_clip(torch.cat(chunks), tiny_vae.decode(latent)[0], 0, frames_of(chunk_end_latents(counts)))


def test_reset_starts_a_new_clip(tiny_vae, clip):
    stream = CausalVAEStream(tiny_vae)
    encode_chunks(stream, clip[:21], (9, 12))
    latent = tiny_vae.encode(clip[:21])
    decode_chunks(stream, latent, [3, 3])
    stream.reset()
    again = encode_chunks(stream, clip[12:33], (9, 12)), decode_chunks(stream, latent.flip(2), [3, 3])
    fresh = CausalVAEStream(tiny_vae)
    expected = encode_chunks(fresh, clip[12:33], (9, 12)), decode_chunks(fresh, latent.flip(2), [3, 3])
    for got, wanted in zip(sum(again, []), sum(expected, [])):
        assert torch.equal(got, wanted)


def test_the_carried_cache_does_not_grow_with_the_chunks(tiny_vae):
    """9 + 12 + 12 + ...: on ComfyUI 0.33 every other chunk ends inside a latent pair (one latent held back), so the
    carried bytes may alternate, but chunks 3 and 10 of the same kind hold the same."""
    frames = torch.rand(9 + 12 * 10, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    stream = CausalVAEStream(tiny_vae)
    held, latents = [], []
    for start, size in zip([0] + list(range(9, 9 + 12 * 10, 12)), [9] + [12] * 10):
        latents.append(stream.encode(frames[start:start + size]))
        stream.decode(latents[-1])
        held.append(stream.cache_bytes())
    assert held[0] > 0
    assert held[2] == held[10] and held[3] == held[9]
    assert max(held[2:]) == max(held[2:4])


def test_refuses_what_it_cannot_stream(tiny_vae, clip, monkeypatch):
    with pytest.raises(ValueError, match="4k\\+1 frames, not 8"):
        CausalVAEStream(tiny_vae).encode(clip[:8])
    stream = CausalVAEStream(tiny_vae)
    stream.encode(clip[:5])
    with pytest.raises(ValueError, match="4k frames, not 5"):
        stream.encode(clip[5:10])
    tiny_decoder = comfy.sd.VAE(sd={k: v.float() for k, v in tiny_models.tiny_decoder_state_dict(16).items()})
    with pytest.raises(ValueError, match="needs the Wan2.1 VAE"):
        CausalVAEStream(tiny_decoder)
    # a ComfyUI whose Wan VAE steps irregularly is refused, not guessed
    def irregular_encode(self, x):
        return self.conv1(torch.cat([self.encoder(x[:, :, :3]), self.encoder(x[:, :, 3:])], 2)).chunk(2, dim=1)[0]

    monkeypatch.setattr(wan_vae.WanVAE, "encode", irregular_encode)
    with pytest.raises(RuntimeError, match="steps its causal cache in a way the pack cannot stream"):
        CausalVAEStream(tiny_vae)


def test_the_stepping_is_read_from_comfyuis_own_loops(tiny_vae):
    """What the recorder reads is what ComfyUI's encode does: its cache list is the one the loop allocates, and
    stepping the real encoder that way over a whole clip in one call gives VAE.encode's latent (any version)."""
    stepping = read_stepping(tiny_vae.first_stage_model)
    print(stepping)
    assert stepping.encode_step in (2, 4) and stepping.decode_step in (1, 2)
    frames = torch.rand(13, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(CausalVAEStream(tiny_vae).encode(frames), tiny_vae.encode(frames))
