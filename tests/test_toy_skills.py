"""The toy world's skills (issue #25): ``locate`` / ``count`` read scenes of several shapes exactly; the task
families' checks, arguments and chance levels (``training.toyworld.skilluse``)."""

from __future__ import annotations

import numpy as np
import pytest

from skills import SKILLS, build_skill, images
from training.toyworld import skilluse
from training.toyworld.data import COLOURS, SHAPES


def test_toy_skills_are_registered_and_share_the_toy_palette():
    from skills.toy import TOY_COLOURS, TOY_SHAPES
    from services.skill_host import SKILL_DEPLOYMENTS

    assert TOY_COLOURS == COLOURS and TOY_SHAPES == SHAPES
    assert {"locate", "count"} <= set(SKILLS) and SKILL_DEPLOYMENTS["skills-toy"] == ("locate", "count")
    schema = SKILLS["locate"].spec().parameters
    assert schema["required"] == ["shape"] and "red" in str(schema["properties"]["colour"])


def test_the_reader_finds_every_shape_of_200_scenes():
    rng = np.random.default_rng(0)
    from skills.toy import read_scene

    for _ in range(200):
        scene = skilluse.render_scene(rng)
        got = read_scene(scene.image)
        assert len(got) == len(scene.shapes)
        for (shape, colour, box), s in zip(sorted(scene.shapes, key=lambda x: (x[2][1], x[2][0])), got):
            assert (s.shape, s.colour) == (shape, colour)
            assert skilluse.box_iou(s.box_px, box) >= 0.8


@pytest.mark.parametrize("family", skilluse.FAMILIES)
def test_the_skill_answers_every_family_request_and_the_check_passes(family):
    skill = build_skill(family)
    tasks = [skilluse.make_task(family, i, seed=1) for i in range(60)]
    for t in tasks:
        r = skill.run(t.arguments, images(t.scene.image))
        assert r.ok, r.error
        answer = r.text if family == "count" else r.text.split(": ", 1)[1]
        assert skilluse.answer_passes(t, answer), (t.question, r.text, t.truth)
        assert skilluse.arguments_right(t, t.arguments)
    # the checks refuse wrong answers, and another request's result (the swapped control) mostly fails
    other = [skill.run(t.arguments, images(tasks[(k + 1) % len(tasks)].scene.image)) for k, t in enumerate(tasks)]
    swapped = np.mean([skilluse.answer_passes(t, o.text if family == "count" else o.text.partition(": ")[2])
                       for t, o in zip(tasks, other)])
    assert swapped < 0.6
    assert not skilluse.answer_passes(tasks[0], "I cannot tell.")
    # a media reference's digits (artifact URL, "image 1") are not an answer
    assert not skilluse.answer_passes(tasks[0], f"![image {tasks[0].truth if family == 'count' else 1}]"
                                                "(http://127.0.0.1:8000/v1/artifacts/art_1)")
    c = skilluse.chance(tasks)
    assert (0.2 < c < 0.35) if family == "locate" else (0.25 < c < 0.6)


def test_family_phrasings_split_and_arguments():
    assert not set(skilluse.LOCATE_PHRASINGS["train"]) & set(skilluse.LOCATE_PHRASINGS["heldout"])
    assert not set(skilluse.COUNT_PHRASINGS["train"]) & set(skilluse.COUNT_PHRASINGS["heldout"])
    t = skilluse.make_task("count", 3)
    again = skilluse.make_task("count", 3)  # deterministic in (family, seed, index)
    assert again.question == t.question and again.truth == t.truth and np.array_equal(again.scene.image, t.scene.image)
    assert skilluse.arguments_right(t, {"colour": t.arguments["colour"], "shape": None})
    assert not skilluse.arguments_right(t, {"colour": t.arguments["colour"], "shape": "circle"})
    assert skilluse.answer_passes(t, f"There are {['zero', 'one', 'two', 'three', 'four'][t.truth]} of them.")
    with pytest.raises(ValueError, match="choose from"):
        skilluse.make_task("teleport", 0)


def test_the_swapped_control_scores_whether_an_answer_says_what_the_swapped_result_says():
    """bench/skilluse.py's ``swapped`` control: a call's result on *another* scene is fed back; ``_follows`` checks the
    answer against that result (count: its number; locate: its box, or no box when it found none)."""
    import json

    from bench.skilluse import _follows

    count = skilluse.make_task("count", 0, seed=3)
    res = build_skill("count").run(json.dumps(count.arguments), images(skilluse.make_task("count", 5, seed=3)
                                                                         .scene.image))
    n = res.data["count"]
    assert _follows(count, res, f"There are {n} {count.arguments['colour']} shapes.")
    assert not _follows(count, res, f"There are {n + 1} {count.arguments['colour']} shapes.")
    locate = skilluse.make_task("locate", 0, seed=3)
    for k in range(1, 40):  # another scene that holds the asked shape, and one that does not
        other = skilluse.make_task("locate", k, seed=3).scene.image
        res = build_skill("locate").run(json.dumps(locate.arguments), images(other))
        if res.boxes:
            box = [int(v) for v in res.boxes[0].box_px]
            assert _follows(locate, res, f"The shape is at {box}.")
            assert not _follows(locate, res, f"The shape is at {[int(v) for v in locate.truth]}.") or \
                skilluse.box_iou(locate.truth, res.boxes[0].box_px) >= 0.5
        else:
            assert _follows(locate, res, "The image has no such shape.")
            assert not _follows(locate, res, f"The shape is at {[int(v) for v in locate.truth]}.")
