"""Presets: registry, YAML round trip, and a YAML preset that builds and runs."""

from __future__ import annotations

import pytest

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.pipeline import AnyToAnyPipeline
from polymodal.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_yaml_round_trip_is_identical(name):
    if name == "toy":
        from polymodal.presets.toy import toy_root

        if not (toy_root() / "decoders").is_dir():
            pytest.skip(f"no toy world build at {toy_root()} (polymodal toyworld build)")
    if name == "toy-3d":
        from polymodal.presets.toy import toy_3d_root

        if not (toy_3d_root() / "decoders" / "object3d").is_dir():
            pytest.skip(f"no toy 3D decoder at {toy_3d_root()} (polymodal toyworld train-3d)")
    if name == "toy-skills":
        from polymodal.presets.toy import SKILLS_EXPORT, toy_root, toy_skills_preset

        if not (toy_root() / SKILLS_EXPORT / "export.json").is_file():  # not trained yet: its unaligned form
            p = toy_skills_preset(aligned=False)
            assert PresetConfig.from_yaml(p.to_yaml()) == p and p.chat.tool_format == "llava-plus"
            return
    p = get_preset(name)
    assert PresetConfig.from_yaml(p.to_yaml()) == p


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="tiny, smol"):
        get_preset("nope")


def test_preset_saved_as_yaml_builds_and_generates(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(get_preset("tiny").to_yaml())
    pipe = AnyToAnyPipeline.from_preset(str(path))
    ans = pipe.generate("draw", modalities=[Modality.IMAGE], seed=0, max_new_tokens=4)
    assert [m.modality for m in ans.media] == [Modality.IMAGE]


def test_broken_yaml_preset_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("foo: [\n")
    with pytest.raises(ValueError, match="invalid preset file"):
        get_preset(str(bad))


def test_serve_refuses_a_port_in_use():
    import socket

    from services.run import serve_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} .* already in use"):
            serve_main("tiny", port=port, no_ray=True)
