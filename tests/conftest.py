"""Shared fixtures for the runtime and CLI tests. Torch-free at import: tests that need torch import
it themselves with ``pytest.importorskip``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LINEAR_MODEL = FIXTURES / "linear_gradmap.onnx"
PLAIN_MODEL = FIXTURES / "plain_linear.onnx"
WRONG_INTERFACE_MODEL = FIXTURES / "wrong_interface.onnx"
PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="session", autouse=True)
def _session_cache_folder(tmp_path_factory):
    """gradmap's session cache (gradmap/runtime/_session_cache.py) in a folder of this test session,
    for the tests and the processes they start: nothing is written to the user's cache, and every
    later load of a model file goes through the cache's read path."""
    saved = os.environ.get("GRADMAP_CACHE_DIR")
    os.environ["GRADMAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("gradmap-session-cache"))
    yield
    if saved is None:
        os.environ.pop("GRADMAP_CACHE_DIR", None)
    else:
        os.environ["GRADMAP_CACHE_DIR"] = saved


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    """Shape first, then values within ``atol``, with the worst difference in the message."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert diff.max(initial=0.0) <= atol, f"{what}: max abs difference {diff.max():.3g} > {atol}"


def image_info(path) -> tuple[tuple[int, int], str]:
    """(width, height) and mode of a picture file, closing it."""
    with Image.open(path) as image:
        return image.size, image.mode


@pytest.fixture(scope="session")
def linear_weights() -> tuple[np.ndarray, np.ndarray]:
    """W [K, 3*32*32] and b [K] of the linear fixture model."""
    data = np.load(FIXTURES / "linear_weights.npz")
    return data["W"], data["b"]


@pytest.fixture(scope="session")
def linear_model():
    from gradmap.runtime import SaliencyModel

    return SaliencyModel(LINEAR_MODEL, provider="cpu", threads=1)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's sample photos as uint8 RGB arrays."""
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTO_NAMES}


@pytest.fixture()
def photo_files(tmp_path: Path, photos: dict[str, np.ndarray]) -> list[Path]:
    """Two of the photos written as JPEG and PNG in tmp."""
    paths = [tmp_path / "chelsea.jpg", tmp_path / "coffee.png"]
    Image.fromarray(photos["chelsea"]).save(paths[0], quality=95)
    Image.fromarray(photos["coffee"]).save(paths[1])
    return paths
