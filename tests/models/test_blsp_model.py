"""Logic tests of the BLSP model on tiny random models: layout, masks, invariances, saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blsp.errors import AudioError, BlspError, ModelLoadError
from blsp.instructions import CONTINUATION, REPETITION
from blsp.models.adapter import ModalityAdapter
from blsp.models.configuration_blsp import BlspConfig
from blsp.models.modeling_blsp import IGNORE_INDEX, BlspModel
from blsp.models.prompt import AudioSpan, make_conversation

SR = 16000


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def _speech_example(seconds: float, seed: int = 0, response: str | None = "the quick brown fox") -> dict:
    return {
        "conversation": make_conversation(CONTINUATION, audio=_audio(seconds, seed)),
        "response": response,
    }


# --------------------------------------------------------------------------- adapter
@pytest.mark.parametrize("kernels", [(5, 5, 5), (3, 5), (5,)])
def test_adapter_lengths_match_convolutions(kernels):
    adapter = ModalityAdapter(16, 24, kernel_sizes=kernels, bottleneck_dim=8)
    for n in [1, 2, 7, 8, 9, 15, 16, 17, 100, 1499, 1500]:
        x = torch.randn(1, n, 16)
        y, lengths = adapter(x, torch.tensor([n]))
        assert y.shape[1] == int(lengths[0]) == adapter.output_lengths(n)
    # three stride-2 convolutions divide by 8, rounding up
    assert ModalityAdapter(4, 4).output_lengths(1500) == 188 == -(-1500 // 8)


def test_adapter_shape_and_parameter_count_match_the_paper():
    # whisper-small (768) -> Llama-2-7B (4096): about 47.5 M parameters in the original code
    adapter = ModalityAdapter(768, 4096)
    n = sum(p.numel() for p in adapter.parameters())
    assert 47.0e6 < n < 48.0e6
    assert [c.kernel_size[0] for c in adapter.convs] == [5, 5, 5]
    assert all(c.stride[0] == 2 and c.padding[0] == 2 for c in adapter.convs)
    assert adapter.fc1.bias is None and adapter.fc2.bias is None and adapter.fc1.out_features == 512


def test_adapter_padding_invariance():
    torch.manual_seed(0)
    adapter = ModalityAdapter(8, 12, bottleneck_dim=4).eval()
    a, b = torch.randn(1, 37, 8), torch.randn(1, 80, 8)
    batch = torch.zeros(2, 80, 8)
    batch[0, :37], batch[1] = a[0], b[0]
    y, lengths = adapter(batch, torch.tensor([37, 80]))
    ya, la = adapter(a, torch.tensor([37]))
    assert int(lengths[0]) == int(la[0])
    torch.testing.assert_close(y[0, : int(la[0])], ya[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- encoder
def test_encoder_variable_length_and_padding_invariance(tiny_model):
    enc = tiny_model.encoder
    clips = [_audio(1.3, 1), _audio(3.0, 2)]
    feats = [enc.features(c) for c in clips]
    assert feats[0].shape[-1] == int(1.3 * SR) // 160  # no padding to 30 s
    lengths = torch.tensor([f.shape[-1] for f in feats])
    x = torch.zeros(2, 80, int(lengths.max()))
    for i, f in enumerate(feats):
        x[i, :, : f.shape[-1]] = f
    with torch.no_grad():
        h, hl = enc(x, lengths)
        alone, al = enc(feats[0][None], lengths[:1])
    n = int(al[0])
    assert n == enc.output_length(lengths[0]) == int(hl[0])
    rel = (h[0, :n] - alone[0, :n]).norm() / alone[0, :n].norm()
    assert rel < 1e-4
    assert torch.all(h[0, n:] == 0)


def test_encoder_long_audio_is_windowed_not_truncated(tiny_model):
    enc = tiny_model.encoder
    f = enc.features(_audio(65.0, 3))
    assert f.shape[-1] == 6500
    with torch.no_grad():
        h, hl = enc(f[None], torch.tensor([6500]))
        first, _ = enc(f[None, :, :3000], torch.tensor([3000]))
    assert int(hl[0]) == 1500 + 1500 + 250 == enc.output_length(6500)
    torch.testing.assert_close(h[0, :1500], first[0], rtol=1e-4, atol=1e-5)


def test_encoder_rejects_bad_audio(tiny_model):
    with pytest.raises(AudioError, match="too short"):
        tiny_model.encoder.features(np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match="NaN"):
        tiny_model.encoder.features(np.full(16000, np.nan, dtype=np.float32))
    with pytest.raises(AudioError, match="mono"):
        tiny_model.encoder.features(np.zeros((2, 16000), dtype=np.float32))


# --------------------------------------------------------------------------- prompt
def test_text_and_speech_paths_are_the_same_prompt_but_for_the_span(tiny_model):
    pb = tiny_model.prompt
    audio = _audio(1.0)
    speech = pb.build(make_conversation(CONTINUATION, audio=audio)).segments
    text = pb.build(make_conversation(CONTINUATION, transcript="the quick brown fox")).segments
    assert len(speech) == len(text) == 3
    assert isinstance(speech[1], AudioSpan)
    assert speech[0] == text[0] and speech[2] == text[2]
    assert text[1] == list(pb._encode("the quick brown fox"))
    # ChatML rendering around the instruction
    rendered = tiny_model.tokenizer.decode(speech[0] + speech[2])
    assert rendered.startswith("<|im_start|>user\n" + CONTINUATION + "\n")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_paper_template_when_the_llm_has_no_chat_template(tiny_dirs):
    cfg = BlspConfig(
        encoder=str(tiny_dirs["whisper"]), llm=str(tiny_dirs["llm_paper"]), adapter_bottleneck_dim=8
    )
    model = BlspModel.from_config(cfg, device="cpu")
    assert not model.prompt.use_chat
    ids = model.prompt.text_prompt(make_conversation(REPETITION, transcript="hello"))
    text = model.tokenizer.decode(ids)
    assert text == "###[Human]:" + REPETITION + "\nhello\n\n\n###[Assistant]:"
    assert model.prompt.response_ids("hi")[-1] == model.tokenizer.eos_token_id


def test_chat_template_forced_without_one_is_an_error(tiny_dirs):
    cfg = BlspConfig(
        encoder=str(tiny_dirs["whisper"]), llm=str(tiny_dirs["llm_paper"]), prompt_template="chat"
    )
    with pytest.raises(BlspError, match="no chat template"):
        BlspModel.from_config(cfg, device="cpu")


# --------------------------------------------------------------------------- collate
def test_collate_layout_labels_masks_positions(tiny_model):
    ex = [_speech_example(1.0, 0, "fox"), _speech_example(2.0, 1, "the quick brown fox jumps")]
    batch = tiny_model.collate(ex, padding_side="right")
    B, L = batch["input_ids"].shape
    assert B == 2
    feat_frames = batch["feature_lengths"].tolist()
    for i in range(2):
        n_speech = int(batch["speech_mask"][i].sum())
        assert n_speech == tiny_model.speech_length(feat_frames[i])
        resp = tiny_model.prompt.response_ids(ex[i]["response"])
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert labelled == resp  # the response and its end-of-turn token, nothing else
        assert resp[-1] == tiny_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # no labels on speech or padding
        assert torch.all(batch["labels"][i][batch["speech_mask"][i]] == IGNORE_INDEX)
        assert torch.all(batch["labels"][i][batch["attention_mask"][i] == 0] == IGNORE_INDEX)
        # positions count only real tokens: 0..n-1, no holes
        valid = batch["attention_mask"][i].bool()
        assert batch["position_ids"][i][valid].tolist() == list(range(int(valid.sum())))
    # right padding: the shorter row's padding is at its end
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][0, 0] == 1
    left = tiny_model.collate(ex, padding_side="left")
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert left["input_ids"].shape[1] == L


# --------------------------------------------------------------------------- forward / generate
def test_forward_loss_and_only_adapter_gets_gradients(tiny_model):
    batch = tiny_model.collate([_speech_example(1.0, 0), _speech_example(1.7, 1, "jumps over")])
    tiny_model.train()
    assert not tiny_model.llm.training and not tiny_model.encoder.training
    out = tiny_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    assert all(p.grad is not None for n, p in tiny_model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if n not in trainable)


def test_padding_invariance_of_loss_and_greedy_output(tiny_model):
    torch.manual_seed(1)
    short, long = _speech_example(0.8, 0, "fox"), _speech_example(2.5, 1, "the quick brown fox jumps over")
    with torch.no_grad():
        alone = tiny_model(**tiny_model.collate([short])).loss
        both = tiny_model.collate([short, long])
        # per-example loss inside the padded batch
        out = tiny_model(**both)
        logits, labels = out.logits[0, :-1], both["labels"][0, 1:]
        in_batch = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-5)
    text_ex = {"conversation": make_conversation(CONTINUATION, transcript="a man in an orange hat")}
    g_alone = tiny_model.generate([short], max_new_tokens=8, return_ids=True)
    g_batch = tiny_model.generate([short, long, text_ex], max_new_tokens=8, return_ids=True)
    assert g_alone[0] == g_batch[0]
    assert tiny_model.generate([text_ex], max_new_tokens=8, return_ids=True)[0] == g_batch[2]


def test_cached_encoder_states_give_the_same_loss(tiny_model):
    batch = tiny_model.collate([_speech_example(1.0, 0), _speech_example(1.4, 2)])
    with torch.no_grad():
        direct = tiny_model(**batch).loss
        hidden, lengths = tiny_model.encode_speech(batch.pop("input_features"), batch.pop("feature_lengths"))
        cached = tiny_model(**batch, encoder_hidden_states=hidden, encoder_lengths=lengths).loss
    torch.testing.assert_close(direct, cached)


def test_multi_turn_mixed_speech_and_text(tiny_model):
    conv = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "audio", "audio": _audio(1.0)}],
        },
        {"role": "assistant", "content": "the fox"},
        {
            "role": "user",
            "content": [{"type": "audio", "audio": _audio(0.7, 4)}, {"type": "text", "text": "again"}],
        },
    ]
    batch = tiny_model.collate([{"conversation": conv}])
    assert batch["input_features"].shape[0] == 2
    assert int(batch["speech_mask"].sum()) == sum(
        tiny_model.speech_length(int(n)) for n in batch["feature_lengths"]
    )
    assert isinstance(tiny_model.generate([{"conversation": conv}], max_new_tokens=4)[0], str)


def test_save_and_load_round_trip_writes_only_the_adapter(tiny_model, tmp_path):
    with torch.no_grad():
        for p in tiny_model.adapter.parameters():
            p.add_(0.01)
    tiny_model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter.safetensors", "config.json"]  # and the model card
    llm_bytes = sum(p.numel() * p.element_size() for p in tiny_model.llm.parameters())
    assert (tmp_path / "adapter.safetensors").stat().st_size < llm_bytes
    loaded = BlspModel.from_pretrained(tmp_path, device="cpu")
    for (n1, p1), (n2, p2) in zip(
        tiny_model.trainable_state_dict().items(), loaded.trainable_state_dict().items(), strict=True
    ):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)
    batch = tiny_model.collate([_speech_example(1.0)])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(**batch).loss, loaded(**batch).loss)


def test_width_mismatch_and_missing_files_are_clear_errors(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"llm_dim": 48', '"llm_dim": 4096')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="llm_dim=4096"):
        BlspModel.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        BlspModel.from_pretrained(tmp_path / "nope", device="cpu")
