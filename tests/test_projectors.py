"""Projectors: shapes, the NExT-GPT input rule, checkpoints with strict loading, registries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import projectors as P
from polymodal.config import ProjectorConfig

D_LLM, N, B = 16, 4, 3
TINY_OPTIONS = {"transformer": {"num_layers": 1, "num_heads": 2, "ff_dim": 32}, "linear": {}, "mlp": {}}
OUTPUT_KINDS = ("transformer", "linear", "mlp")


def out_config(kind: str, **kw) -> ProjectorConfig:
    return ProjectorConfig(kind=kind, hidden_dim=16, options=TINY_OPTIONS[kind], **kw)


def build_out(kind: str, q: int = 8, d_cond: int = 12, normalize: bool = False, seed: int = 0, **kw):
    return P.build_output_projector(
        out_config(kind, **kw), d_llm=D_LLM, num_signal_tokens=N, cond_shape=(q, d_cond), normalize=normalize, seed=seed
    )


def states(seed: int = 1, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, N, D_LLM, generator=g), torch.randn(batch, N, D_LLM, generator=g)


def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


# --- shapes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
@pytest.mark.parametrize("q,d_cond,normalize", [(77, 24, False), (8, 12, False), (1, 20, True)])
def test_output_shapes_and_normalisation(kind, q, d_cond, normalize):
    proj = build_out(kind, q=q, d_cond=d_cond, normalize=normalize)
    hidden, embeds = states()
    out = proj(hidden, embeds)
    assert out.shape == (B, q, d_cond)
    assert torch.isfinite(out).all()
    norms = out.norm(dim=-1)
    if normalize:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    # Each batch item is projected on its own.
    alone = proj(hidden[1:2], embeds[1:2])
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=1e-5)


def test_mean_mixing_is_the_token_mean_for_one_query():
    proj = P.build_output_projector(
        ProjectorConfig(kind="linear", options={"mixing": "mean"}), d_llm=D_LLM, num_signal_tokens=N,
        cond_shape=(1, 12),
    )
    hidden, embeds = states()
    expected = proj.fc(hidden + embeds).mean(dim=1, keepdim=True)
    torch.testing.assert_close(proj(hidden, embeds), expected)
    with pytest.raises(ValueError, match="Q = 1"):
        P.build_output_projector(ProjectorConfig(kind="linear", options={"mixing": "mean"}), d_llm=D_LLM,
                                 num_signal_tokens=N, cond_shape=(8, 12))


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_input_is_hidden_plus_token_embeds(kind):
    proj = build_out(kind)
    hidden, embeds = states()
    out = proj(hidden, embeds)
    other = embeds.clone()
    other[:, 0] += 1.0
    assert not torch.allclose(proj(hidden, other), out, atol=1e-4)
    # Only the sum matters: moving part of the embeddings into the hidden states changes nothing.
    torch.testing.assert_close(proj(hidden + embeds, torch.zeros_like(embeds)), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj(hidden + 0.5 * embeds, 0.5 * embeds), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
def test_forward_rejects_wrong_shapes(kind):
    proj = build_out(kind)
    with pytest.raises(ValueError, match=f"N={N}"):
        proj(torch.zeros(1, N + 1, D_LLM), torch.zeros(1, N + 1, D_LLM))
    with pytest.raises(ValueError, match="token_embeds"):
        proj(torch.zeros(1, N, D_LLM), torch.zeros(1, N, D_LLM + 1))


def test_input_projector_shapes():
    media = torch.randn(B, 10)
    lin = P.build_input_projector(ProjectorConfig(kind="linear"), d_enc=10, d_llm=D_LLM, seed=0)
    out = lin(media)
    assert out.shape == (B, 1, D_LLM)
    torch.testing.assert_close(out[:, 0], media @ lin.fc.weight.T + lin.fc.bias)

    mlp = P.build_input_projector(ProjectorConfig(kind="mlp", num_queries=3, hidden_dim=8), d_enc=10, d_llm=D_LLM)
    out = mlp(media)
    assert out.shape == (B, 3, D_LLM)
    assert not torch.allclose(out[:, 0], out[:, 1])  # k distinct tokens, not one repeated
    torch.testing.assert_close(mlp(media[2:3]), out[2:3])
    with pytest.raises(ValueError, match="D_enc=10"):
        mlp(torch.randn(B, 11))
    with pytest.raises(ValueError, match="k = 2"):
        P.build_input_projector(ProjectorConfig(kind="linear", num_queries=2), d_enc=10, d_llm=D_LLM)


def test_input_projector_maps_each_encoder_token_in_order():
    tokens = torch.randn(B, 5, 10)  # (B, N, D_enc), e.g. a class token and 4 patches
    mlp = P.build_input_projector(ProjectorConfig(kind="mlp", num_queries=2, hidden_dim=8), d_enc=10, d_llm=D_LLM)
    out = mlp(tokens)
    assert out.shape == (B, 5 * 2, D_LLM) and mlp.prompt_tokens(5) == 10
    for n in range(5):  # the k tokens of encoder token n, from that token alone
        torch.testing.assert_close(out[:, 2 * n:2 * n + 2], mlp(tokens[:, n]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp(tokens[:, :1]), mlp(tokens[:, 0]))  # N = 1 is the pooled form
    with pytest.raises(ValueError, match=r"\(B, N, D_enc=10\)"):
        mlp(torch.randn(B, 5, 11))
    with pytest.raises(ValueError, match="got \\(2, 3, 4, 10\\)"):
        mlp(torch.randn(2, 3, 4, 10))


# --- registries and builders --------------------------------------------------------------------------


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError) as err:
        P.build_output_projector(ProjectorConfig(kind="qformer"), d_llm=D_LLM, num_signal_tokens=N, cond_shape=(1, 8))
    assert "qformer" in str(err.value)
    assert all(k in str(err.value) for k in P.OUTPUT_PROJECTORS)
    with pytest.raises(ValueError) as err:
        P.build_input_projector(ProjectorConfig(kind="transformer"), d_enc=8, d_llm=D_LLM)
    assert all(k in str(err.value) for k in P.INPUT_PROJECTORS)
    assert {"transformer", "linear", "mlp"} <= set(P.OUTPUT_PROJECTORS)
    assert {"linear", "mlp"} <= set(P.INPUT_PROJECTORS)


def test_unknown_or_bad_option_is_named():
    with pytest.raises(ValueError, match="num_layer'.*accepted: dropout, ff_dim, num_heads, num_layers"):
        P.build_output_projector(ProjectorConfig(kind="transformer", hidden_dim=16, options={"num_layer": 2}),
                                 d_llm=D_LLM, num_signal_tokens=N, cond_shape=(1, 8))
    with pytest.raises(ValueError, match="num_heads"):
        P.build_output_projector(ProjectorConfig(kind="transformer", hidden_dim=16, options={"num_heads": 3}),
                                 d_llm=D_LLM, num_signal_tokens=N, cond_shape=(1, 8))


def test_explicit_num_queries_must_match_the_decoder():
    with pytest.raises(ValueError, match=r"num_queries \(4\).*Q \(8\)"):
        build_out("linear", q=8, num_queries=4)
    assert build_out("linear", q=8, num_queries=8).num_queries == 8
    assert build_out("linear", q=8).num_queries == 8  # left unset: the decoder's Q


def test_seed_makes_initialisation_reproducible_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = build_out("transformer", seed=3), build_out("transformer", seed=3), build_out("transformer", seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.query_embs, c.query_embs)


# --- NExT-GPT layout ----------------------------------------------------------------------------------


def transformer_param_count(d_llm: int, d: int, heads: int, layers: int, ff: int, q: int, d_cond: int) -> int:
    """Parameters of fc -> nn.Transformer(norm_first) -> out_fc with Q queries, from the layer sizes."""
    assert d % heads == 0  # heads split d; they add no parameters
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    layer_norm = 2 * d
    attention = linear(d, 3 * d) + linear(d, d)  # packed q/k/v in_proj + out_proj
    feed_forward = linear(d, ff) + linear(ff, d)
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm  # self- and cross-attention
    transformer = layers * encoder_layer + layer_norm + layers * decoder_layer + layer_norm  # + final norms
    return linear(d_llm, d) + transformer + q * d + linear(d, d_cond)


def test_transformer_parameter_count_at_nextgpt_size():
    config = ProjectorConfig(kind="transformer", num_queries=77, hidden_dim=512,
                             options={"num_layers": 4, "num_heads": 4, "ff_dim": 2048})
    with torch.device("meta"):
        proj = P.build_output_projector(config, d_llm=4096, num_signal_tokens=4, cond_shape=(77, 768))
    count = sum(p.numel() for p in proj.parameters())
    assert count == transformer_param_count(4096, 512, 4, 4, 2048, 77, 768)
    assert proj.query_embs.shape == (1, 77, 512)
    assert proj.fc.weight.shape == (512, 4096) and proj.out_fc.weight.shape == (768, 512)


class NextGPTStyleLayer(nn.Module):
    """NExT-GPT's TextFcLayer "transformer" layout, written from its description, for a parity check."""

    def __init__(self, d_llm: int, d: int, heads: int, layers: int, ff: int, q: int, d_cond: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_llm, d)
        self.tfm = nn.Transformer(d_model=d, nhead=heads, num_encoder_layers=layers, num_decoder_layers=layers,
                                  dim_feedforward=ff, dropout=0.0, batch_first=True, norm_first=True)
        self.model = nn.Linear(d, d_cond)
        self.query_embs = nn.Parameter(torch.randn(1, q, d))

    def forward(self, x: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_nextgpt_keys_map_onto_the_transformer_projector():
    torch.manual_seed(0)
    ref = NextGPTStyleLayer(D_LLM, 16, 2, 2, 32, 5, 12).eval()
    renamed = {}
    for key, value in ref.state_dict().items():
        prefix = next(p for p in P.NEXTGPT_TRANSFORMER_KEY_MAP if key.startswith(p))
        renamed[P.NEXTGPT_TRANSFORMER_KEY_MAP[prefix] + key[len(prefix):]] = value
    proj = P.build_output_projector(
        ProjectorConfig(kind="transformer", hidden_dim=16, options={"num_layers": 2, "num_heads": 2, "ff_dim": 32}),
        d_llm=D_LLM, num_signal_tokens=N, cond_shape=(5, 12),
    ).eval()
    proj.load_state_dict(renamed, strict=True)
    hidden, embeds = states()
    with torch.no_grad():
        torch.testing.assert_close(proj(hidden, embeds), ref(hidden, embeds), atol=1e-5, rtol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------------


ROUND_TRIP = [("output", k, q, norm) for k in OUTPUT_KINDS for q, norm in ((8, False), (1, True))] + [
    ("input", "linear", 1, False), ("input", "mlp", 3, False)]


@pytest.mark.parametrize("role,kind,q,normalize", ROUND_TRIP)
def test_save_load_round_trip(tmp_path, role, kind, q, normalize):
    path = tmp_path / "sub" / f"{kind}.safetensors"
    if role == "output":
        proj = build_out(kind, q=q, normalize=normalize).eval()
        inputs = states()
    else:
        proj = P.build_input_projector(ProjectorConfig(kind=kind, num_queries=q, hidden_dim=8), d_enc=10,
                                       d_llm=D_LLM, seed=0)
        inputs = (torch.randn(B, 10),)
    P.save_projector(proj, path, extra_metadata={"preset": "tiny", "modality": "audio"})
    path2 = tmp_path / "sub" / "again.safetensors"
    P.save_projector(proj, path2)
    P.save_projector(proj, path2)  # overwriting is fine
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path2.name])  # no temp files left

    _, meta = read_file(path)
    assert meta["type"] == kind and meta["role"] == role and meta["preset"] == "tiny"
    if role == "output":
        assert (meta["d_llm"], meta["N"], meta["Q"], meta["D_cond"]) == (str(D_LLM), str(N), str(q), "12")
    else:
        assert (meta["d_enc"], meta["d_llm"], meta["k"]) == ("10", str(D_LLM), str(q))
    assert json.loads(meta["options"]) == proj.init_kwargs()

    loaded = P.load_projector(path, expected={"type": kind, "d_llm": D_LLM})
    assert type(loaded) is type(proj) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), proj(*inputs))


def test_save_rejects_reserved_metadata_and_foreign_modules(tmp_path):
    proj = build_out("linear")
    with pytest.raises(ValueError, match="'Q' is reserved"):
        P.save_projector(proj, tmp_path / "x.safetensors", extra_metadata={"Q": "1"})
    with pytest.raises(TypeError):
        P.save_projector(nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def saved_transformer(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "transformer.safetensors"
    proj = build_out("transformer").eval()
    P.save_projector(proj, path)
    return proj, path


def tampered(tmp_path, source, change) -> str:
    tensors, meta = read_file(source)
    change(tensors)
    out = tmp_path / "tampered.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return str(out)


def test_strict_load_names_missing_key(tmp_path, saved_transformer):
    proj, path = saved_transformer
    bad = tampered(tmp_path, path, lambda t: t.pop("out_fc.bias"))
    with pytest.raises(P.ProjectorLoadError, match=r"missing key\(s\): out_fc\.bias"):
        P.load_projector(bad)
    loose = P.load_projector(bad, strict=False)  # the rest loads; the missing tensor keeps its init
    assert torch.equal(loose.out_fc.weight, proj.out_fc.weight)
    assert torch.equal(loose.query_embs, proj.query_embs)


def test_strict_load_names_unexpected_key(tmp_path, saved_transformer):
    _, path = saved_transformer
    bad = tampered(tmp_path, path, lambda t: t.update({"gen_text_hidden_fcs.0.extra": torch.zeros(2)}))
    with pytest.raises(P.ProjectorLoadError, match=r"unexpected key\(s\): gen_text_hidden_fcs\.0\.extra"):
        P.load_projector(bad)


def test_strict_load_names_shape_mismatch(tmp_path, saved_transformer):
    _, path = saved_transformer
    bad = tampered(tmp_path, path, lambda t: t.update({"query_embs": torch.zeros(1, 5, 16)}))
    with pytest.raises(P.ProjectorLoadError, match=r"query_embs checkpoint \(1, 5, 16\) vs model \(1, 8, 16\)"):
        P.load_projector(bad)


def test_expected_metadata_mismatch_names_the_field(saved_transformer):
    _, path = saved_transformer
    with pytest.raises(P.ProjectorLoadError, match=r"Q: checkpoint has '8', expected 77") as err:
        P.load_projector(path, expected={"Q": 77, "N": N})
    assert "N:" not in str(err.value)  # only what differs is named
    with pytest.raises(P.ProjectorLoadError, match=r"d_llm: checkpoint has '16', expected 4096"):
        P.load_projector(path, expected={"d_llm": 4096})
    with pytest.raises(P.ProjectorLoadError, match=r"num_layers: checkpoint has 1, expected 4"):
        P.load_projector(path, expected={"num_layers": 4})
    with pytest.raises(P.ProjectorLoadError, match=r"type: checkpoint has 'transformer', expected 'linear'"):
        P.load_projector(path, expected={"type": "linear"})
    with pytest.raises(P.ProjectorLoadError, match="d_enc: not recorded"):
        P.load_projector(path, expected={"d_enc": 1024})


def test_foreign_or_missing_files_are_load_errors(tmp_path):
    with pytest.raises(P.ProjectorLoadError, match="not found"):
        P.load_projector(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(P.ProjectorLoadError, match="no polymodal projector metadata"):
        P.load_projector(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(P.ProjectorLoadError, match="not a readable safetensors file"):
        P.load_projector(junk)


def test_builder_loads_config_checkpoint_and_checks_it(saved_transformer):
    proj, path = saved_transformer
    built = build_out("transformer", seed=99, checkpoint=str(path))
    hidden, embeds = states()
    with torch.no_grad():
        assert torch.equal(built(hidden, embeds), proj(hidden, embeds))
    other = ProjectorConfig(kind="transformer", hidden_dim=16, checkpoint=str(path),
                            options={**TINY_OPTIONS["transformer"], "num_layers": 2})
    with pytest.raises(P.ProjectorLoadError, match="num_layers: checkpoint has 1, expected 2"):
        P.build_output_projector(other, d_llm=D_LLM, num_signal_tokens=N, cond_shape=(8, 12))
    with pytest.raises(P.ProjectorLoadError, match="normalize: checkpoint has False, expected True"):
        build_out("transformer", normalize=True, checkpoint=str(path))
