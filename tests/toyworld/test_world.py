"""The ToyWorld generator, captions, detector and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from negguide.toyworld import world

N_SCENES = 2000


@pytest.fixture(scope="module")
def scenes() -> list[world.Scene]:
    rng = np.random.default_rng(123)
    return [world.sample_scene(rng) for _ in range(N_SCENES)]


def _names(indices: tuple[int, ...] | list[int]) -> set[str]:
    return {world.object_name(i) for i in indices}


def test_deterministic_by_seed() -> None:
    a_img, a_cap = world.sample_batch(16, np.random.default_rng(7))
    b_img, b_cap = world.sample_batch(16, np.random.default_rng(7))
    c_img, _ = world.sample_batch(16, np.random.default_rng(8))
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)


def test_images_are_palette_pictures_in_range(scenes: list[world.Scene]) -> None:
    images = np.stack([s.image for s in scenes[:200]])
    assert images.shape == (200, 3, world.SIZE, world.SIZE) and images.dtype == np.float32
    allowed = {(1.0, 1.0, 1.0), *world.COLORS.values()}
    pixels = {tuple(p) for p in ((images.transpose(0, 2, 3, 1).reshape(-1, 3) + 1) / 2).tolist()}
    assert pixels <= allowed


def test_detector_accuracy_on_drawn_scenes(scenes: list[world.Scene]) -> None:
    images = np.stack([s.image for s in scenes])
    found = world.detect(images)
    truth = np.zeros_like(found)
    for i, s in enumerate(scenes):
        truth[i, list(s.objects)] = True
    scene_accuracy = (found == truth).all(axis=1).mean()
    assert scene_accuracy >= 0.999, scene_accuracy


def test_detector_on_hand_made_images() -> None:
    blank = np.ones((1, 3, world.SIZE, world.SIZE), np.float32)
    assert not world.detect(blank).any()
    img = blank.copy()
    img[0, :, :4, :3] = np.asarray([-1.0, -1.0, 1.0])[:, None, None]  # 12 blue pixels: present
    assert world.present(img, 1).tolist() == [True]
    img = blank.copy()
    img[0, :, :1, :11] = np.asarray([-1.0, -1.0, 1.0])[:, None, None]  # 11: not present
    assert world.present(img, 1).tolist() == [False]


def test_primary_always_named_and_captions_truthful(scenes: list[world.Scene]) -> None:
    for s in scenes:
        primary = s.objects[0]
        assert primary in world.COMPANION
        if not s.caption:
            continue
        named = set(s.caption.split(" and "))
        assert world.object_name(primary) in named
        assert named <= _names(s.objects)  # never names what is not drawn
        assert set(s.caption.split()) <= set(world.WORDS)


def test_caption_statistics(scenes: list[world.Scene]) -> None:
    with_companion = [s for s in scenes if world.COMPANION[s.objects[0]] in s.objects]
    share = len(with_companion) / N_SCENES
    assert abs(share - world.P_COMPANION) < 0.025  # 4 sigma of a binomial(2000, 0.9)
    assert abs(np.mean([s.caption == "" for s in scenes]) - world.P_EMPTY) < 0.03
    named = [
        world.object_name(world.COMPANION[s.objects[0]]) in s.caption.split(" and ")
        for s in with_companion
        if s.caption
    ]
    assert abs(np.mean(named) - world.P_NAME_COMPANION) < 0.05  # captions usually omit the companion
    primaries = [s.objects[0] for s in scenes]
    for p in world.COMPANION:
        assert abs(primaries.count(p) / N_SCENES - 1 / 3) < 0.05


def test_cleanliness() -> None:
    images, _ = world.sample_batch(8, np.random.default_rng(0))
    assert np.allclose(world.cleanliness(images), 1.0)
    grey = np.zeros((2, 3, world.SIZE, world.SIZE), np.float32)  # (0.5, 0.5, 0.5): far from every palette colour
    assert np.allclose(world.cleanliness(grey), 0.0)
    half = np.ones((1, 3, world.SIZE, world.SIZE), np.float32)
    half[0, :, : world.SIZE // 2] = 0.0
    assert world.cleanliness(half)[0] == pytest.approx(0.5)


def test_score_on_known_images() -> None:
    rng = np.random.default_rng(0)
    with_both = np.stack([world.draw([0, 1], rng) for _ in range(3)])
    primary_only = world.draw([0], rng)[None]
    images = np.concatenate([with_both, primary_only])
    s = world.score(images, "red circle", "blue square")
    assert s == {"positive": 1.0, "removed": 0.25, "clean": 1.0}
    assert world.PAIRS == (
        ("red circle", "blue square"),
        ("green triangle", "yellow square"),
        ("magenta circle", "cyan triangle"),
    )


def test_extras_are_the_other_four_objects() -> None:
    assert world.extras("red circle", "blue square") == (
        "green triangle",
        "yellow square",
        "magenta circle",
        "cyan triangle",
    )
    for prompt, companion in world.PAIRS:
        assert {prompt, companion, *world.extras(prompt, companion)} == _names(range(len(world.OBJECTS)))


def test_score_objects_on_hand_made_images() -> None:
    """Companion removed, extras removed and 'only the primary' on pictures drawn with known objects."""
    rng = np.random.default_rng(1)
    images = np.stack(
        [
            world.draw([0], rng),  # the primary alone
            world.draw([0, 1], rng),  # with its companion
            world.draw([0, 3], rng),  # with an extra
            world.draw([0, 1, 5], rng),  # with both
            world.draw([1, 2], rng),  # the primary lost: the companion and an extra
            np.ones((3, world.SIZE, world.SIZE), np.float32),  # blank
        ]
    )
    s = world.score_objects(images, "red circle", "blue square")
    assert s == {
        **world.score(images, "red circle", "blue square"),
        "extras_removed": pytest.approx(3 / 6),
        "only": pytest.approx(1 / 6),
    }
    assert s["positive"] == pytest.approx(4 / 6) and s["removed"] == pytest.approx(3 / 6)
    # a pair's primary is an extra of another pair: the same red circle, scored for the green triangle
    other = world.score_objects(images[:1], "green triangle", "yellow square")
    assert other["extras_removed"] == 0.0 and other["only"] == 0.0 and other["removed"] == 1.0
