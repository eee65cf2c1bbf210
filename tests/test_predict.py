"""predict.preprocess makes MNIST-like digits from any image; Predictor and `digits-jax predict` read them."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from digits_jax import checkpoint, cli, ensemble, predict, train
from digits_jax.predict import Predictor, load_image, predict_files, preprocess
from tests.conftest import REPO

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSans-Oblique.ttf"]
CANVAS = 200


def render(font: str, digit: int, size: int, where: tuple[float, float], light: bool) -> np.ndarray:
    """(200, 200) uint8: `digit` at font size `size`, its box at fraction `where` (x, y) of the free space."""
    if not (FONT_DIR / font).exists():
        pytest.skip(f"font {FONT_DIR / font} not installed (Debian package fonts-dejavu-core/-extra)")
    face = ImageFont.truetype(str(FONT_DIR / font), size)
    left, top, right, bottom = face.getbbox(str(digit))
    x = -left + where[0] * (CANVAS - (right - left))
    y = -top + where[1] * (CANVAS - (bottom - top))
    image = Image.new("L", (CANVAS, CANVAS), 255 if light else 0)
    ImageDraw.Draw(image).text((x, y), str(digit), fill=0 if light else 255, font=face)
    return np.asarray(image)


def ink_box_and_centre(digit: np.ndarray) -> tuple[int, int, float, float]:
    """(height, width) of the nonzero pixels' box and the centre of mass (row, column), in NumPy."""
    image = digit[..., 0].astype(np.float64)
    rows, cols = np.nonzero(image)
    ys, xs = np.indices(image.shape)
    return (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, (image * ys).sum() / image.sum(),
            (image * xs).sum() / image.sum())


def assert_like_mnist(digit: np.ndarray, what: str) -> None:
    assert digit.dtype == np.uint8 and digit.shape == (28, 28, 1), what
    assert digit.max() == 255 and digit[0, 0, 0] == digit[-1, -1, 0] == 0, f"{what}: not bright ink on black"
    height, width, row, col = ink_box_and_centre(digit)
    assert 18 <= max(height, width) <= 20, f"{what}: ink box {height}x{width}, MNIST's larger side is 20"
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1, f"{what}: centre of mass ({row:.2f}, {col:.2f})"


@pytest.mark.parametrize("font", FONTS)
def test_typeset_digits_land_like_mnist(font):
    rng = np.random.default_rng(FONTS.index(font))
    for digit in range(10):
        for light in (True, False):
            size, where = int(rng.integers(24, 200)), (rng.uniform(), rng.uniform())
            what = f"{font} {digit} size {size} at {where[0]:.2f},{where[1]:.2f} {'light' if light else 'dark'}"
            assert_like_mnist(preprocess(render(font, digit, size, where, light)), what)


def test_dark_on_light_and_light_on_dark_give_the_same_digit():
    image = render("DejaVuSerif.ttf", 4, 90, (0.2, 0.7), light=True)
    np.testing.assert_array_equal(preprocess(image), preprocess(255 - image))


def test_size_and_position_do_not_change_the_digit_much():
    small = preprocess(render("DejaVuSans.ttf", 2, 40, (0.1, 0.1), light=True)).astype(int)
    large = preprocess(render("DejaVuSans.ttf", 2, 180, (0.9, 0.6), light=True)).astype(int)
    assert np.abs(small - large).mean() < 12  # of 255: the same glyph, resampled from different sizes


def test_a_dark_frame_or_desk_around_the_page_is_not_taken_for_the_background():
    """The edge's level was the background: a frame or a desk made the page the ink and the digit a hole in it."""
    page = render("DejaVuSans.ttf", 3, 120, (0.5, 0.5), light=True)
    expected = preprocess(page).astype(int)
    framed = page.copy()
    framed[:3], framed[-3:], framed[:, :3], framed[:, -3:] = 0, 0, 0, 0
    on_desk = np.full((CANVAS + 40, CANVAS + 40), 60, np.uint8)
    on_desk[20:-20, 20:-20] = 235 - (255 - page) * 0.8  # a grey page, dark ink
    for what, image in (("framed", framed), ("on a desk", on_desk)):
        assert np.abs(preprocess(image).astype(int) - expected).mean() < 3, what
    # A page smaller than the desk around it: not guessed at.
    small_page = np.full((3 * CANVAS, 3 * CANVAS), 60, np.uint8)
    small_page[CANVAS:2 * CANVAS, CANVAS:2 * CANVAS] = page
    with pytest.raises(ValueError, match=r"no digit found: .* fills \d+% of a 200 x 200 box .*crop the image to "
                                         "the digit"):
        preprocess(small_page)


@pytest.mark.parametrize("digit", [0, 6, 8, 9])
def test_a_bold_digit_filling_its_box_is_not_taken_for_a_page(digit):
    """A first version took the ink of bold digits cropped tightly for the background: only their holes were left."""
    font = FONT_DIR / "DejaVuSans-Bold.ttf"
    if not font.exists():
        pytest.skip(f"font {font} not installed (Debian package fonts-dejavu-core)")
    face = ImageFont.truetype(str(font), 100)
    left, top, right, bottom = face.getbbox(str(digit), stroke_width=4)
    image = Image.new("L", (right - left, bottom - top), 255)
    ImageDraw.Draw(image).text((-left, -top), str(digit), fill=0, font=face, stroke_width=4, stroke_fill=0)
    tight = np.asarray(image)
    ink = preprocess(tight).astype(int)
    assert (ink > 0).mean() > 0.3  # the strokes, not the holes between them
    assert np.abs(ink - preprocess(np.pad(tight, 40, constant_values=255)).astype(int)).mean() < 8


def test_large_images_are_reduced_when_decoded_to_the_same_digit():
    """A 4096 x 4096 PNG of 70 kB took 1 GB and 3 s in preprocess's float64 copies."""
    small = render("DejaVuSans.ttf", 6, 150, (0.4, 0.5), light=True)
    large = Image.fromarray(small).resize((4000, 4000), Image.Resampling.NEAREST)
    array = predict.to_array(large)
    assert array.shape == (1000, 1000) and array.dtype == np.uint8
    assert np.abs(preprocess(array).astype(int) - preprocess(small).astype(int)).mean() < 3
    sixteen = predict.to_array(Image.fromarray(np.asarray(large).astype(np.uint16) * 257))  # Pillow cannot reduce it
    assert sixteen.shape == (1000, 1000) and sixteen.dtype == np.float32
    np.testing.assert_allclose(sixteen, array / 255.0, atol=1e-6)
    # 32-bit integers above 255 (16-bit values) are reduced once, not again as 16-bit.
    wide = predict.to_array(Image.fromarray(np.asarray(large).astype(np.int32) * 257, "I"))
    assert wide.shape == (1000, 1000)
    # Partial blocks at the edge are kept, as Image.reduce keeps them: ink in the last column stays.
    edge = np.zeros((1025, 1025), np.uint16)
    edge[:, -1] = 65535
    for image in (Image.fromarray(edge), Image.fromarray((edge // 257).astype(np.uint8))):
        reduced = predict.to_array(image)
        assert reduced.shape == (513, 513) and reduced[:, -1].min() > 0


def test_colour_inputs():
    coverage = render("DejaVuSans.ttf", 5, 120, (0.5, 0.5), light=False).astype(np.float64) / 255
    expected = preprocess(render("DejaVuSans.ttf", 5, 120, (0.5, 0.5), light=False))
    paper, pen = np.array([250, 240, 190]), np.array([20, 30, 140])  # blue ink on yellowish paper
    blue_on_paper = (paper + coverage[..., None] * (pen - paper)).round().astype(np.uint8)
    chalk = (np.array([30, 70, 40]) + coverage[..., None] * np.array([200, 170, 200])).round().astype(np.uint8)
    for what, image in (("blue on paper", blue_on_paper), ("chalk on green", chalk)):
        result = preprocess(image)
        assert_like_mnist(result, what)
        assert np.abs(result.astype(int) - expected).max() <= 3, what


def test_rgba_ink_on_a_transparent_sheet_and_opaque_rgba():
    coverage = render("DejaVuSansMono.ttf", 8, 100, (0.3, 0.4), light=False)
    expected = preprocess(coverage)
    for ink in (0, 255):  # black or white ink: the transparent sheet shows as the contrasting colour
        rgba = np.dstack([np.full((CANVAS, CANVAS, 3), ink, np.uint8), coverage])
        np.testing.assert_allclose(preprocess(rgba), expected, atol=1, err_msg=f"ink {ink}")
    opaque = np.dstack([np.repeat(255 - coverage[..., None], 3, axis=2), np.full_like(coverage, 255)])
    np.testing.assert_allclose(preprocess(opaque), expected, atol=1)


def test_float_and_single_channel_inputs_match_uint8():
    image = render("DejaVuSans-Bold.ttf", 3, 70, (0.6, 0.2), light=True)
    expected = preprocess(image)
    np.testing.assert_allclose(preprocess(image.astype(np.float32) / 255), expected, atol=1)
    np.testing.assert_array_equal(preprocess(image[..., None]), expected)


def test_faint_background_noise_is_not_ink():
    rng = np.random.default_rng(0)
    image = render("DejaVuSerif.ttf", 7, 60, (0.5, 0.5), light=True).astype(int)
    noisy = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    assert_like_mnist(preprocess(noisy), "digit on noisy paper")


@pytest.mark.parametrize("image", [np.full((50, 60), 255, np.uint8), np.zeros((30, 30, 3), np.uint8),
                                   np.random.default_rng(0).integers(120, 126, (40, 40)).astype(np.uint8)],
                         ids=["white", "black-rgb", "faint-noise"])
def test_an_image_without_ink_is_an_error(image):
    with pytest.raises(ValueError, match="the image has no ink"):
        preprocess(image)


def test_an_unusable_shape_is_an_error():
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\)"):
        preprocess(np.zeros((4, 4, 2), np.uint8))


def test_load_image_names_the_file_and_the_problem(tmp_path):
    Image.fromarray(render("DejaVuSans.ttf", 1, 80, (0.5, 0.5), light=True)).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png").shape == (CANVAS, CANVAS)
    (tmp_path / "cut.png").write_bytes((tmp_path / "one.png").read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, problem in (("missing.png", "no such file"), ("text.png", "not an image"), ("cut.png", "cannot decode"),
                          ("empty.png", r"the file is empty \(0 bytes\)")):
        with pytest.raises(ValueError, match=f"{tmp_path / name}: {problem}"):
            load_image(tmp_path / name)


def test_an_image_too_large_to_decode_says_so(tmp_path, monkeypatch):
    """Pillow's decompression-bomb refusal was reported as "it may be damaged or cut short"."""
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels: over twice the limit, refused
    with pytest.raises(ValueError, match=f"{tmp_path / 'big.png'}: too large to read .*; scale it down"):
        load_image(tmp_path / "big.png")


def test_float_and_32_bit_integer_files_read_on_their_own_scale(tmp_path):
    image = render("DejaVuSans.ttf", 4, 120, (0.4, 0.5), light=True)
    expected = preprocess(image)
    for name, mode, pixels in (("float-0-1", "F", image / 255), ("float-0-255", "F", image),
                               ("int-8-bit", "I", image), ("int-16-bit", "I", image.astype(np.int32) * 257)):
        path = tmp_path / f"{name}.tif"
        Image.fromarray(pixels.astype(np.float32 if mode == "F" else np.int32)).save(path)
        assert Image.open(path).mode == mode
        np.testing.assert_allclose(preprocess(load_image(path)), expected, atol=1, err_msg=name)
    for low, high in ((0, 70000), (-5, 255)):
        Image.fromarray(np.array([[low, high], [high, high]], np.int32)).save(tmp_path / "wide.tif")
        with pytest.raises(ValueError, match=f"pixels from {low} to {high}: .* 8- or 16-bit PNG"):
            load_image(tmp_path / "wide.tif")


def test_integer_arrays_of_any_type_read_on_the_scale_of_their_values():
    """An int64 array of 0-255 pixels (NumPy's type for Python ints) was divided by 2**63 - 1: "no ink"."""
    image = render("DejaVuSans.ttf", 4, 120, (0.4, 0.5), light=True)
    expected = preprocess(image)
    for pixels in (image.astype(np.int64), image.astype(np.int32), np.array(image.tolist()),
                   image.astype(np.int64) * 257):
        np.testing.assert_allclose(preprocess(pixels), expected, atol=1, err_msg=str(pixels.dtype))
    negative = image.astype(np.int64)
    negative[0, 0] = -1
    with pytest.raises(ValueError, match=r"int64 pixels from -1 to \d+: only 0..255 \(8-bit\) and 0..65535"):
        preprocess(negative)


def damaged_tiff() -> bytes:
    """An 8x8 TIFF whose strip offsets are typed RATIONAL, not LONG: Pillow's load() raises TypeError on it."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="TIFF")
    entry = struct.pack("<HH", 273, 4)  # StripOffsets' IFD entry: tag, type LONG (Pillow writes little-endian)
    assert buffer.getvalue().count(entry) == 1
    return buffer.getvalue().replace(entry, struct.pack("<HH", 273, 5))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config, tiny_data):
    """A one-epoch run evaluated with test-time augmentation (tta_shift=1), which Predictor must apply too."""
    workdir = tmp_path_factory.mktemp("predict") / "tiny"
    train.train_and_evaluate(tiny_config.replace(epochs=1, tta_shift=1), workdir, datasets=tiny_data)
    return workdir


def numpy_softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_predict_gives_the_softmax_of_the_models_logits(tiny_run, tiny_data, tiny_config):
    restored = checkpoint.restore(tiny_run)
    predictor = Predictor(restored.state.apply_fn, restored.state.variables)  # tta_shift=0: one view per image
    test = {k: v[:300] for k, v in tiny_data["test"].items()}
    probabilities = predictor.predict(test["image"])
    assert probabilities.dtype == np.float32 and probabilities.shape == (300, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    logits = np.asarray(restored.state.apply_fn(restored.state.variables, test["image"].astype(np.float32) / 255,
                                                train=False), np.float64)
    np.testing.assert_allclose(probabilities, numpy_softmax(logits), atol=1e-5)
    result = train.evaluate(restored.state.apply_fn, restored.state.variables, test, tiny_config.eval_batch_size)
    assert (probabilities.argmax(axis=1) == test["label"]).mean() == result.accuracy
    # Padding the batch to a power of two leaves the real rows alone.
    np.testing.assert_allclose(predictor.predict(test["image"][:3]), probabilities[:3], atol=1e-6)


def test_predictor_from_a_checkpoint_uses_its_runs_tta_shift_as_eval_does(tiny_run, tiny_data):
    restored = checkpoint.restore(tiny_run)
    assert restored.config.tta_shift == 1
    fn, variables = restored.state.apply_fn, restored.state.variables
    test = {k: v[:300] for k, v in tiny_data["test"].items()}
    probabilities = Predictor.from_checkpoint(tiny_run).predict(test["image"])
    np.testing.assert_allclose(probabilities, ensemble.probabilities(fn, variables, test["image"], tta_shift=1),
                               atol=1e-6)
    assert not np.allclose(probabilities, ensemble.probabilities(fn, variables, test["image"], tta_shift=0), atol=1e-4)
    result = train.evaluate(fn, variables, test, restored.config.eval_batch_size, tta_shift=restored.config.tta_shift)
    assert (probabilities.argmax(axis=1) == test["label"]).mean() == result.accuracy


def test_predict_goes_through_the_model_max_batch_images_at_a_time(tiny_run, tiny_data, monkeypatch):
    restored = checkpoint.restore(tiny_run)
    images = tiny_data["test"]["image"][:11]
    expected = Predictor(restored.state.apply_fn, restored.state.variables).predict(images)
    shapes = set()

    def recording_apply_fn(variables, x, train):
        shapes.add(x.shape)  # at trace time: one entry per compiled batch shape
        return restored.state.apply_fn(variables, x, train=train)

    monkeypatch.setattr(predict, "MAX_BATCH", 4)
    chunked = Predictor(recording_apply_fn, restored.state.variables).predict(images)
    assert shapes == {(4, 28, 28, 1)}  # 4 + 4 + 3 images, the last call padded
    np.testing.assert_allclose(chunked, expected, atol=1e-6)


def test_predict_rejects_images_that_were_not_preprocessed(tiny_run):
    predictor = Predictor.from_checkpoint(tiny_run)
    with pytest.raises(ValueError, match=r"uint8 \(B, 28, 28, 1\).*float32 \(2, 28, 28\).*preprocess"):
        predictor.predict(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="no images"):
        predictor.predict(np.zeros((0, 28, 28, 1), np.uint8))
    # One preprocessed image was told to go through preprocess(): what it had been.
    with pytest.raises(ValueError, match=r"takes a batch, uint8 \(B, 28, 28, 1\), got one image \(28, 28, 1\): "
                                         r"give image\[None\]"):
        predictor.predict(preprocess(render("DejaVuSans.ttf", 3, 100, (0.5, 0.5), light=True)))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    Image.fromarray(render("DejaVuSans.ttf", 7, 150, (0.3, 0.6), light=True)).convert("RGB").save(directory / "a.jpg")
    Image.fromarray(render("DejaVuSerif.ttf", 0, 60, (0.8, 0.1), light=False)).save(directory / "b.png")
    (directory / "broken.png").write_text("not an image")
    Image.new("L", (64, 64), 200).save(directory / "blank.png")
    return [directory / name for name in ("a.jpg", "broken.png", "b.png", "blank.png")]


def test_predict_files_reports_bad_files_and_predicts_the_rest(tiny_run, image_files):
    results = predict_files(Predictor.from_checkpoint(tiny_run), image_files)
    assert [r.path for r in results] == [str(p) for p in image_files]
    good, broken, other, blank = results
    for r in (good, other):
        assert r.error is None and 0 <= r.digit <= 9 and r.probability == max(r.probabilities)
    assert broken.digit is None and broken.error.startswith(f"{image_files[1]}: not an image")
    assert blank.digit is None and blank.error.startswith(f"{image_files[3]}: the image has no ink")


def test_predict_files_names_a_file_pillow_fails_on_with_any_error_and_predicts_the_rest(tiny_run, image_files,
                                                                                          tmp_path):
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(damaged_tiff())
    with pytest.raises(TypeError), Image.open(damaged) as image:
        image.load()
    good, bad = predict_files(Predictor.from_checkpoint(tiny_run), [image_files[0], damaged])
    assert good.error is None and 0 <= good.digit <= 9
    assert bad.digit is None and bad.error.startswith(f"{damaged}: cannot decode it (")
    with pytest.raises(ValueError) as raised:
        load_image(damaged)
    assert isinstance(raised.value.__cause__, TypeError)


def test_cli_predict_exit_code_is_1_when_a_file_fails_and_the_others_are_predicted(tiny_run, image_files):
    good, broken, other, _ = map(str, image_files)
    result = subprocess.run([sys.executable, "-m", "digits_jax", "predict", "--checkpoint", str(tiny_run), good,
                             broken, other, "--json"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [good, broken, other]
    assert rows[0]["digit"] is not None and rows[2]["digit"] is not None and rows[1]["error"]
    assert f"digits-jax predict: error: {broken}: not an image" in result.stderr


def test_cli_predict_prints_a_table(tiny_run, image_files, capsys):
    good, _, other, _ = map(str, image_files)
    assert cli.main(["predict", "--checkpoint", str(tiny_run), good, other]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["file", "digit", "probability"]
    assert [row.split()[0] for row in rows] == [good, other]
    assert all(row.split()[1].isdigit() and row.endswith("%") for row in rows)


def test_the_package_exposes_the_modules_and_errors_its_docs_name():
    """README's Python examples use `digits_jax.ensemble`, `digits_jax.predict` and catch ModelNeededError."""
    import digits_jax

    assert digits_jax.ensemble is ensemble and digits_jax.predict is predict
    assert digits_jax.ModelNeededError is checkpoint.ModelNeededError
    assert all(hasattr(digits_jax, name) for name in digits_jax.__all__)
