"""NExT-GPT checkpoint converter and the nextgpt-7b preset, on a format-faithful synthetic checkpoint.

The synthetic ``pytorch_model.pt`` has the released key names and layout (peft 0.3 LoRA names with
``.default``, resized ``embed_tokens`` / ``lm_head`` with the 7b_tiva_v0 rows, ``llama_proj``, three
``TextFcLayer``-style transformer projectors, saved as parameters with ``torch.save``) at tiny sizes over a
tiny Llama saved with ``save_pretrained`` as the "Vicuna" base, and tiny diffusers decoders on disk.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from decoders import Medium, save_tiny_checkpoint
from polymodal.config import DecoderConfig, DecoderDefaults, EncoderConfig, PresetConfig, ProjectorConfig
from polymodal.llm import PromptSegment
from polymodal.modality import Modality
from polymodal.offline_tokenizer import tiny_tokenizer
from polymodal.pipeline import AnyToAnyPipeline
from polymodal.presets import get_preset
from polymodal.presets.builtin import BUILTIN  # NExT-GPT's three modalities
from training.convert import (
    BaseModelInfo,
    ConversionError,
    convert_nextgpt,
    parse_nextgpt_state_dict,
    write_nextgpt_export,
)
from training.convert.cli import app

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
D_LLM, LAYERS, RANK, D_ENC, D_MODEL = 64, 2, 4, 32, 32
COND = {IMAGE: (8, 32), AUDIO: (1, 32), VIDEO: (8, 32)}  # (Q, D_cond) of the tiny decoders
PREFIX = {IMAGE: "gen_text_hidden_fcs.0.", VIDEO: "gen_text_hidden_fcs_video.0.", AUDIO: "gen_text_hidden_fcs_audio.0."}
PEFT = "llama_model.base_model.model."


class RefTextFc(nn.Module):
    """The released output projector's layout ("transformer" mode, paper sec. 3): names fc / tfm / model /
    query_embs; input = hidden state + signal-token embedding."""

    def __init__(self, d_in: int, d_out: int, q: int):
        super().__init__()
        self.fc = nn.Linear(d_in, D_MODEL)
        self.tfm = nn.Transformer(d_model=D_MODEL, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                  dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
        self.model = nn.Linear(D_MODEL, d_out)
        self.query_embs = nn.Parameter(torch.randn(1, q, D_MODEL))

    def forward(self, hidden: torch.Tensor, token_embs: torch.Tensor) -> torch.Tensor:
        x = self.fc(hidden + token_embs)
        return self.model(self.tfm(x, self.query_embs.expand(x.shape[0], -1, -1)))


def _preset_yaml(root, vicuna, decoders) -> str:
    base = get_preset("nextgpt-7b").model_dump(mode="python")
    base.update(
        name="nextgpt-tiny-test",
        llm={**base["llm"], "path": str(vicuna), "dtype": "float32"},
        generation={**base["generation"], "max_new_tokens": 6},
        encoders={m: EncoderConfig(kind="tiny", dim=D_ENC) for m in BUILTIN},
        output_projectors={m: ProjectorConfig(kind="transformer", num_queries=COND[m][0], hidden_dim=D_MODEL,
                                              options={"num_layers": 1, "num_heads": 2, "ff_dim": 64})
                           for m in BUILTIN},
        decoders=decoders,
    )
    path = root / "nextgpt-tiny.yaml"
    path.write_text(PresetConfig.model_validate(base).to_yaml())
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny Vicuna + tiny decoders on disk, a preset YAML over them, and a synthetic released checkpoint."""
    root = tmp_path_factory.mktemp("nextgpt")
    torch.manual_seed(0)
    tok = tiny_tokenizer(512)
    vicuna_model = LlamaForCausalLM(LlamaConfig(
        hidden_size=D_LLM, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=False,
    )).eval()
    vicuna = root / "vicuna-7b-v0"
    vicuna_model.save_pretrained(vicuna)
    tok.save_pretrained(vicuna)
    decoders = {}
    for m in BUILTIN:
        cfg = DecoderConfig(source="pretrained", cond_tokens=COND[m][0], cond_dim=COND[m][1],
                            defaults=DecoderDefaults(num_inference_steps=2, guidance_scale=7.5, height_px=32,
                                                     width_px=32, num_frames=3, fps=8, duration_s=0.2))
        path = save_tiny_checkpoint(m, cfg, root / f"decoder_{m.value}", seed=3)
        decoders[m] = cfg.model_copy(update={"path": str(path)})
    preset_path = _preset_yaml(root, vicuna, decoders)
    preset = get_preset(preset_path)
    added = preset.llm.added_tokens
    v0 = len(tok)

    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    emb = vicuna_model.get_input_embeddings().weight.detach()
    head = vicuna_model.get_output_embeddings().weight.detach()
    # the base rows were trainable in NExT-GPT (moved a little); the added rows are new
    state[PEFT + "model.embed_tokens.weight"] = nn.Parameter(torch.cat([emb + 0.01 * torch.randn_like(emb),
                                                                        0.02 * torch.randn(len(added), D_LLM)]))
    state[PEFT + "lm_head.weight"] = nn.Parameter(torch.cat([head + 0.01 * torch.randn_like(head),
                                                             0.02 * torch.randn(len(added), D_LLM)]))
    for i in range(LAYERS):
        for p in ("q", "k", "v", "o"):
            key = f"{PEFT}model.layers.{i}.self_attn.{p}_proj"
            state[f"{key}.lora_A.default.weight"] = nn.Parameter(0.05 * torch.randn(RANK, D_LLM))
            state[f"{key}.lora_B.default.weight"] = nn.Parameter(0.05 * torch.randn(D_LLM, RANK))
    llama_proj = nn.Linear(D_ENC, D_LLM)
    for k, v in llama_proj.named_parameters():
        state[f"llama_proj.{k}"] = v
    refs = {}
    for m in (IMAGE, VIDEO, AUDIO):  # the released order of the modules
        refs[m] = RefTextFc(D_LLM, COND[m][1], COND[m][0]).eval()
        for k, v in refs[m].named_parameters():
            state[PREFIX[m] + k] = v
    ckpt = root / "pytorch_model.pt"
    torch.save(state, ckpt)
    plain = {k: v.detach().clone() for k, v in state.items()}
    return dict(root=root, vicuna=vicuna, vicuna_model=vicuna_model, preset_path=preset_path, preset=preset,
                ckpt=ckpt, state=plain, refs=refs, llama_proj=llama_proj, v0=v0, added=added)


@pytest.fixture(scope="module")
def export(world):
    out = world["root"] / "export"
    report = convert_nextgpt(world["ckpt"], out, preset=world["preset_path"])  # base: the preset's local llm.path
    return out, report


@pytest.fixture(scope="module")
def pipe(world, export):
    return AnyToAnyPipeline.from_preset(world["preset_path"], device="cpu", export_dir=str(export[0]))


def _parse(world, state):
    return parse_nextgpt_state_dict(state, world["preset"], base=BaseModelInfo.load(world["vicuna"]))


# ------------------------------------------------------------------------------------------------
# the preset


def test_nextgpt_preset_is_the_released_composition():
    p = get_preset("nextgpt-7b")
    spec = p.signals.spec()
    assert spec.tokens[IMAGE] == ("[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]")
    assert len(spec.tokens[AUDIO]) == 8 and len(spec.tokens[VIDEO]) == 24
    assert set(spec.input_markers.values()) == {("<Img>", "</Img>")}
    # the released vocabulary: 32000 + <Img> </Img> [IMG0..3] [VID0..23] [AUD0..7], in that order
    added = p.llm.added_tokens
    assert len(added) == 38
    assert added[:6] == ("<Img>", "</Img>", "[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]")
    assert added[6] == "[VID0]" and added[29] == "[VID23]" and added[30] == "[AUD0]" and added[37] == "[AUD7]"
    chat = p.chat
    assert chat.user_prefix == "### Human: " and chat.assistant_prefix == "### Assistant:" and "###" in chat.stop
    d = {m: c.defaults for m, c in p.decoders.items()}
    assert all(x.guidance_scale == 7.5 and x.num_inference_steps == 50 for x in d.values())
    assert (d[VIDEO].height_px, d[VIDEO].width_px, d[VIDEO].num_frames, d[VIDEO].fps) == (320, 576, 24, 8)
    assert d[AUDIO].duration_s == 9.0
    assert p.summed_inputs
    assert PresetConfig.from_yaml(p.to_yaml()) == p


def test_vicuna_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYMODAL_VICUNA_V0", str(tmp_path / "v0"))
    assert get_preset("nextgpt-7b").llm.path == str(tmp_path / "v0")


# ------------------------------------------------------------------------------------------------
# conversion


def test_every_key_is_mapped_and_parts_written(world, export):
    out, report = export
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["key_map"]) == set(world["state"])
    assert not any(v.startswith("dropped") for v in manifest["key_map"].values())
    assert set(report.parts) == {"token_rows", "lora", *(f"{r}_{m.value}" for r in ("input", "output") for m in BUILTIN)}
    assert report.rows == "all" and report.rows_written == world["v0"] + 38
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == RANK and cfg["lora_alpha"] == 32 and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(out / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == LAYERS * 4 * 2
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys


def test_loaded_model_has_released_ids_rows_and_merged_lora(world, pipe):
    eng = pipe.llm_stage.engine
    v0, added, state = world["v0"], world["added"], world["state"]
    # ids after resizing are the released ones: base + i in added-token order
    assert [eng.tokenizer.convert_tokens_to_ids(t) for t in added] == list(range(v0, v0 + len(added)))
    assert eng.signal_ids[IMAGE] == list(range(v0 + 2, v0 + 6))
    assert eng.signal_ids[VIDEO][0] == v0 + 6 and eng.signal_ids[AUDIO][0] == v0 + 30
    # every row of both matrices is the checkpoint's (the base rows were trained too)
    torch.testing.assert_close(eng.model.get_input_embeddings().weight, state[PEFT + "model.embed_tokens.weight"])
    torch.testing.assert_close(eng.model.get_output_embeddings().weight, state[PEFT + "lm_head.weight"])
    # LoRA merged with NExT-GPT's scaling alpha / r = 32 / 4
    base_w = world["vicuna_model"].model.layers[1].self_attn.k_proj.weight.detach()
    a = state[f"{PEFT}model.layers.1.self_attn.k_proj.lora_A.default.weight"]
    b = state[f"{PEFT}model.layers.1.self_attn.k_proj.lora_B.default.weight"]
    torch.testing.assert_close(eng.model.model.layers[1].self_attn.k_proj.weight, base_w + (32 / RANK) * b @ a)
    assert set(eng.export_parts) == {"token_rows", "lora"}


def test_projectors_match_the_released_layout(world, pipe):
    for m in BUILTIN:
        proj = pipe.llm_stage.input_projectors[m]
        torch.testing.assert_close(proj.fc.weight, world["llama_proj"].weight.detach())
    n = {IMAGE: 4, AUDIO: 8, VIDEO: 24}
    torch.manual_seed(1)
    for m, stage in pipe.decoder_stages.items():
        hs, te = torch.randn(2, n[m], D_LLM), torch.randn(2, n[m], D_LLM)
        want = world["refs"][m](hs, te)
        if m is AUDIO:  # AudioLDM's CLAP space: the projector normalises (see polymodal.pipeline)
            want = F.normalize(want, dim=-1)
        torch.testing.assert_close(stage.projector(hs, te), want, rtol=1e-4, atol=1e-5)
        assert stage.init_state == "pretrained"


def test_generates_end_to_end(pipe):
    answer = pipe.generate("draw a cat, let it meow and show a clip", modalities=[IMAGE, AUDIO, VIDEO], seed=0)
    media = {p.modality: p for p in answer.media}
    assert all(isinstance(p, Medium) for p in media.values()), answer.media
    assert set(media) == {IMAGE, AUDIO, VIDEO}
    assert media[IMAGE].data.shape == (32, 32, 3)
    assert media[VIDEO].data.shape == (3, 32, 32, 3)
    assert media[AUDIO].data.ndim == 1 and media[AUDIO].data.size > 0


def test_signal_states_are_taken_at_the_trained_positions(pipe):
    """Training read hidden_states[-1][s:s+N] with s the position of [IMG0] (the token as input)."""
    eng = pipe.llm_stage.engine
    segs = eng.chat_segments([("user", [PromptSegment("draw a cat", trusted=False)])])
    out = eng.generate(segs, required=[IMAGE], max_new_tokens=2, allow_signals=False)
    g = next(x for x in out.groups if x.modality is IMAGE)
    full_ids = [None] * out.prompt_len + out.generated_ids
    assert [full_ids[p] for p in g.positions] == eng.signal_ids[IMAGE]
    ref = eng.reference_states(segs, out.generated_ids)
    torch.testing.assert_close(g.hidden_states, ref[list(g.positions)], rtol=1e-4, atol=1e-4)
    earlier = ref[[p - 1 for p in g.positions]]  # the released inference code's gen_idx - 1 window
    assert not torch.allclose(g.hidden_states, earlier, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# strictness


def test_unknown_key_is_an_error_naming_it(world):
    state = dict(world["state"])
    bad = f"{PEFT}model.layers.0.mlp.up_proj.lora_A.default.weight"
    state[bad] = torch.zeros(RANK, D_LLM)
    with pytest.raises(ConversionError, match=r"unknown key.*mlp\.up_proj\.lora_A"):
        _parse(world, state)


def test_missing_keys_are_errors_naming_them(world):
    state = dict(world["state"])
    del state[f"{PEFT}model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    with pytest.raises(ConversionError, match=r"missing LoRA key.*layers\.1\.self_attn\.v_proj\.lora_B"):
        _parse(world, state)
    state = dict(world["state"])
    del state["gen_text_hidden_fcs_video.0.query_embs"]
    with pytest.raises(ConversionError, match=r"video output projector.*missing key.*gen_text_hidden_fcs_video\.0\.query_embs"):
        _parse(world, state)
    state = dict(world["state"])
    del state[PEFT + "lm_head.weight"]
    with pytest.raises(ConversionError, match=r"missing key: llama_model\.base_model\.model\.lm_head\.weight"):
        _parse(world, state)


def test_other_vocabulary_version_is_refused(world):
    state = dict(world["state"])
    for k in (PEFT + "model.embed_tokens.weight", PEFT + "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.zeros(4, D_LLM)])  # + <Vid> </Vid> <Aud> </Aud>: 42 added rows
    v0 = world["v0"]
    with pytest.raises(ConversionError, match=rf"{v0 + 42} rows.*{v0 + 38} rows expected.*<Vid>.*another version"):
        _parse(world, state)
    # without the base model: a base vocabulary one larger (an extra pad token) is named
    with pytest.raises(ConversionError, match=rf"{v0 + 38} rows, .*{v0 + 39} rows expected.*base vocabulary is {v0}"):
        parse_nextgpt_state_dict(world["state"], world["preset"], base_vocab_size=v0 + 1)


def test_shape_mismatches_are_errors(world):
    state = dict(world["state"])
    state["llama_proj.weight"] = torch.zeros(D_LLM, D_ENC + 1)
    with pytest.raises(ConversionError, match=r"llama_proj\.weight \(64, 33\)"):
        _parse(world, state)
    state = dict(world["state"])
    state["gen_text_hidden_fcs.0.model.weight"] = torch.zeros(16, D_MODEL)  # D_cond 16, the decoder takes 32
    with pytest.raises(ConversionError, match=r"image output projector.*gen_text_hidden_fcs\.0\.model\.weight \(16, 32\) vs \(32, 32\)"):
        _parse(world, state)
    state = dict(world["state"])
    state[f"{PEFT}model.layers.0.self_attn.q_proj.lora_B.default.weight"] = torch.zeros(D_LLM, RANK + 1)
    with pytest.raises(ConversionError, match=r"LoRA shape mismatch.*layers\.0\.self_attn\.q_proj\.lora_B"):
        _parse(world, state)


def test_names_variants_and_deliberate_drops(world):
    state = {k.replace(PEFT + "model.embed_tokens", "llama_model.model.embed_tokens"): v for k, v in world["state"].items()}
    state["visual_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}  # peft 0.2 names
    delta = _parse(world, state)
    assert delta.key_map["llama_model.model.embed_tokens.weight"] == "token_rows.safetensors:input_embeddings"
    assert delta.key_map["visual_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight"].startswith("dropped")
    assert len(delta.lora) == LAYERS * 8
    both = dict(world["state"]) | {"llama_model.model.embed_tokens.weight": world["state"][PEFT + "model.embed_tokens.weight"]}
    with pytest.raises(ConversionError, match="both"):
        _parse(world, both)


def test_new_rows_only_without_base(world, tmp_path):
    delta = parse_nextgpt_state_dict(world["state"], world["preset"], base_vocab_size=world["v0"])
    report = write_nextgpt_export(delta, tmp_path / "exp", world["preset"], rows="auto")
    assert report.rows == "new" and report.rows_written == 38
    with safe_open(str(tmp_path / "exp" / "token_rows.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["tokens"]) == list(world["added"])
        rows = f.get_tensor("input_embeddings")
    torch.testing.assert_close(rows, world["state"][PEFT + "model.embed_tokens.weight"][world["v0"]:])
    manifest = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert any("rows 0.." in k for k in manifest["dropped"])
    with pytest.raises(ConversionError, match="needs the base model"):
        write_nextgpt_export(delta, tmp_path / "exp2", world["preset"], rows="all")
    with pytest.raises(ConversionError, match="not empty"):
        write_nextgpt_export(delta, tmp_path / "exp", world["preset"], rows="new")


def test_cli(world, tmp_path):
    runner = CliRunner()
    args = ["nextgpt", str(world["ckpt"]), "--out", str(tmp_path / "cli"), "--preset", world["preset_path"],
            "--base", str(world["vicuna"])]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "wrote" in ok.output and (tmp_path / "cli" / "lora" / "adapter_config.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad = runner.invoke(app, ["nextgpt", str(junk), "--out", str(tmp_path / "bad"), "--preset", world["preset_path"]])
    assert bad.exit_code == 2 and "error:" in bad.output and not (tmp_path / "bad").exists()
