"""The embedded shapes dataset: determinism, ground truth consistent with the pixels, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.path import Path
from scipy import ndimage

from sendvae.data.shapes import ShapesDataset, uniforms
from sendvae.data.shapes_config import ATTRIBUTES, BACKGROUND_COLOURS, OCCLUDED_THRESHOLD, ShapesConfig
from sendvae.data.shapes_render import (
    DEFAULT_SHAPES,
    DEPTH_BACKGROUND,
    DEPTH_BEHIND,
    DEPTH_FRONT,
    DEPTH_MAIN,
    SHAPES,
    place,
    rasterise,
    texture_colour,
)

RES = 64
_SQUARE = np.ones((3, 3), bool)  # 8-connected structuring element


@pytest.fixture(scope="module")
def ds() -> ShapesDataset:
    return ShapesDataset(resolution=RES, seed=3)


@pytest.fixture(scope="module")
def rendered(ds):
    """240 rendered samples with their maps and attribute table."""
    images, masks, depths, table = ds.render_many(np.arange(240))
    return images.transpose(0, 2, 3, 1), masks, depths, table  # images (N, H, W, 3)


def _analytic(table, j, res=RES, prefix=""):
    """Area and perimeter in pixels implied by the size attribute and the shape."""
    size = table[prefix + "size"][j] * res
    shape = SHAPES[DEFAULT_SHAPES[table[prefix + "shape"][j]]]
    return size**2, shape.perimeter * size


def test_determinism_and_seeds():
    a, b = ShapesDataset(resolution=RES, seed=0), ShapesDataset(resolution=RES, seed=0)
    for i in (0, 7, 999_999):
        x, y = a.render(i), b.render(i)
        assert x.image.tobytes() == y.image.tobytes() and x.mask.tobytes() == y.mask.tobytes()
        assert np.array_equal(a[i][0].permute(1, 2, 0).numpy(), x.image) and a[i][1] == x.label
    other = ShapesDataset(resolution=RES, seed=1)
    differ = [not torch.equal(a[i][0], other[i][0]) for i in range(8)]
    assert all(differ)
    assert not torch.equal(a[0][0], a[1][0])
    assert torch.equal(a[-1][0], a[len(a) - 1][0])
    with pytest.raises(IndexError):
        a[len(a)]


def test_uniform_draws():
    u = uniforms(0, np.arange(20_000), 4)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert np.allclose(u.mean(axis=0), 0.5, atol=0.01)
    assert np.abs(np.corrcoef(u.T)[np.triu_indices(4, 1)]).max() < 0.03  # columns independent
    assert not np.array_equal(u, uniforms(1, np.arange(20_000), 4))
    assert np.array_equal(uniforms(0, [5, 17], 4), u[[5, 17]])  # a function of (seed, index) only


@pytest.mark.parametrize("res", [32, 48, 64, 100, 256])
def test_resolutions(res):
    ds = ShapesDataset(resolution=res, length=10)
    image, label = ds[3]
    assert image.shape == (3, res, res) and image.dtype == torch.uint8
    assert 0 <= label < ds.num_classes == len(ds.class_names) >= 6
    s = ds.render(3)
    assert s.image.shape == (res, res, 3) and s.mask.shape == s.depth.shape == (res, res)
    assert s.mask.dtype == np.uint8 and s.depth.dtype == np.float32
    assert (s.mask == 1).any()


def test_bad_config():
    for res in (16, 31, 257, 512):
        with pytest.raises(ValueError, match="resolution"):
            ShapesConfig(resolution=res)
    with pytest.raises(ValueError, match="shapes"):
        ShapesConfig(shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="size_range"):
        ShapesConfig(size_range=(0.2, 0.6))
    with pytest.raises(ValueError, match="texture_prob"):
        ShapesDataset(texture_prob=1.5)


def test_rasteriser_matches_independent_point_sampling():
    """Coverage from the scanline integrator vs matplotlib's point-in-polygon test on a dense 16 x 16
    grid per pixel (sampling error per pixel up to a few / 16)."""
    res, n_sub = 48, 16
    names = tuple(SHAPES)
    ids = np.arange(len(names))
    size, x, y = np.full(len(names), 0.45), np.full(len(names), 0.5), np.full(len(names), 0.5)
    rot = 17.0 + 41.3 * ids  # generic angles: no edge lies along a pixel row
    r0, c0, cov = rasterise(names, ids, size, x, y, rot, res, supersample=8)
    sub = (np.arange(res * n_sub) + 0.5) / n_sub
    pts = np.stack(np.meshgrid(sub, sub), axis=-1).reshape(-1, 2)  # (x, y) sample points
    area = (0.45 * res) ** 2  # unit-area templates
    for k, name in enumerate(names):
        poly = place(SHAPES[name].vertices, size[k], x[k], y[k], rot[k], res)
        inside = Path(poly).contains_points(pts).reshape(res, n_sub, res, n_sub).mean(axis=(1, 3))
        full = np.zeros((res, res))
        full[r0 : r0 + cov.shape[1], c0 : c0 + cov.shape[2]] = cov[k]
        assert np.abs(full - inside).max() < 0.15, name
        assert abs(full.sum() - area) < 0.001 * area, name
    # Worst case for the vertical sampling: horizontal edges, off by up to 1 / (2 ss) of a row each.
    _, _, square = rasterise(names, np.array([2]), size[:1], x[:1] + 0.013, y[:1] + 0.017, [0.0], res, 8)
    assert abs(square.sum() - area) <= 2 * (0.45 * res) / 16


def test_area_centroid_colour_background(ds, rendered):
    """For images without a second object: mask area, centroid, fill colour and background agree with
    the attributes.

    Tolerances: coverage is exact, so the only mask error is thresholding boundary pixels at 1/2; each
    contributes at most 1/2 and there are at most ~sqrt(2) x perimeter of them (worst case 0.71 P).
    Errors cancel along an edge; measured |error| <= 0.12 P, we allow 0.25 P. On flat backgrounds the
    antialiased alpha is recoverable from the pixels (uint8 rounding: <= 0.5 / contrast per boundary
    pixel, contrast >= 60), so its sum must equal the analytic area to ~0.5%.
    """
    images, masks, depths, t = rendered
    single = np.flatnonzero(~t["has_second"])
    assert len(single) > 80
    bg_palette = np.array(list(BACKGROUND_COLOURS.values()), np.float64)
    for j in single:
        area, perimeter = _analytic(t, j)
        m = masks[j] == 1
        assert set(np.unique(masks[j])) <= {0, 1}
        assert abs(m.sum() - area) <= 0.25 * perimeter, j
        rows, cols = np.nonzero(m)
        assert (
            abs(cols.mean() + 0.5 - t["x"][j] * RES) < 0.5 and abs(rows.mean() + 0.5 - t["y"][j] * RES) < 0.5
        )
        fill = np.array([t["fill_r"][j], t["fill_g"][j], t["fill_b"][j]])
        inner = ndimage.binary_erosion(m, _SQUARE, iterations=2)
        assert inner.sum() > 10 and (images[j][inner] == fill).all()  # exact interior colour
        assert np.all(depths[j][m] == DEPTH_MAIN) and np.all(depths[j][~m] == DEPTH_BACKGROUND)
        base = bg_palette[t["background_colour"][j]]
        # Antialiased pixels reach past the >= 1/2 mask by under 2 px (star tips are the sharpest).
        outside = ~ndimage.binary_dilation(m, _SQUARE, iterations=2)
        bg = images[j][outside].astype(np.float64)  # (P, 3)
        if t["background"][j] == 0:
            assert (bg == base).all()
            c = np.argmax(np.abs(fill - base))
            alpha = (images[j][..., c].astype(np.float64) - base[c]) / (fill[c] - base[c])
            assert abs(alpha.sum() - area) < 0.005 * area + 1, j
            yy, xx = np.mgrid[:RES, :RES] + 0.5
            assert abs((alpha * xx).sum() / alpha.sum() - t["x"][j] * RES) < 0.1
        else:  # every background pixel mixes the base and texture colours, and the texture shows
            delta = texture_colour(base) - base
            w = (bg - base) @ delta / (delta @ delta)
            assert np.abs(base + w[:, None] * delta - bg).max() <= 1.0
            assert w.min() > -0.02 and w.max() < 1.02 and w.max() - w.min() > 0.5


def test_second_object_layers_and_occlusion(rendered):
    """Depth follows the layer order; the visible main area matches the occlusion attribute."""
    images, masks, depths, t = rendered
    checked = 0
    for j in np.flatnonzero(t["has_second"]):
        area, perimeter = _analytic(t, j)
        main, second = masks[j] == 1, masks[j] == 2
        front = t["second_in_front"][j]
        if second.any():
            assert np.all(depths[j][second] == (DEPTH_FRONT if front else DEPTH_BEHIND))
            assert (depths[j][second].min() < DEPTH_MAIN) == front
        assert np.all(depths[j][main] == DEPTH_MAIN)
        # Behind: the main object is whole. In front: it loses occluded_fraction of its area (the
        # attribute is a 256-point estimate: ~3% sampling error, plus the boundary tolerance).
        hidden = t["occluded_fraction"][j]
        assert (hidden == 0) or front
        assert abs(main.sum() - (1 - hidden) * area) <= 0.25 * perimeter + 0.03 * area, j
        if front and hidden > 0:
            overlap = ndimage.binary_dilation(main, iterations=1) & second
            assert overlap.any()  # the occluder borders the visible main object
            checked += 1
        assert t["occluded"][j] == (hidden >= OCCLUDED_THRESHOLD)
    assert checked >= 5


def test_attribute_table_matches_attributes(ds, rendered):
    t = rendered[3]
    idx = np.arange(0, 240, 7)
    table = ds.attribute_table(idx)
    assert list(table) == [s.name for s in ATTRIBUTES]
    for pos, i in enumerate(idx):
        one = ds.attributes(int(i))
        np.testing.assert_equal(ds.render(int(i)).attributes, one)  # NaN-aware dict comparison
        for name, value in one.items():
            np.testing.assert_equal(table[name][pos], value)
            np.testing.assert_equal(t[name][i], value)
    for spec in ATTRIBUTES:
        v = table[spec.name]
        if spec.kind == "binary":
            assert v.dtype == bool
        elif spec.kind == "categorical":
            present = v >= 0
            assert v.dtype == np.int64 and (v[present] < len(spec.classes)).all()
            assert spec.applies_if is not None or present.all()
        else:
            assert v.dtype == np.float64
        if spec.applies_if == "has_second":
            absent = ~table["has_second"]
            assert np.all(v[absent] == -1) if spec.kind == "categorical" else np.isnan(v[absent]).all()
    assert (table["second_colour"][table["has_second"]] != table["colour"][table["has_second"]]).all()


def test_binary_attributes(ds):
    idx = np.arange(500)
    b, t = ds.binary_attribute_table(idx), ds.attribute_table(idx)
    assert tuple(b) == ds.binary_attribute_names
    assert all(v.dtype == bool and v.shape == (500,) for v in b.values())
    shapes = np.stack([b[f"is_{s}"] for s in ds.class_names], axis=1)
    assert (shapes.sum(1) == 1).all() and (shapes.argmax(1) == t["shape"]).all()
    assert (b["textured_background"] == (t["background"] > 0)).all()
    assert (b["occluded"] <= b["second_in_front"]).all() and (
        b["second_in_front"] <= b["has_second_object"]
    ).all()
    rates = np.array([v.mean() for v in b.values()])
    assert (rates > 0.02).all() and (rates < 0.98).all()  # every label is informative


def test_labels_uniform():
    ds = ShapesDataset(resolution=32, seed=11)
    labels = np.array([label for _, label in ds.__getitems__(list(range(600)))])
    counts = np.bincount(labels, minlength=ds.num_classes)
    expected = 600 / ds.num_classes
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    assert counts.min() > 0.5 * expected


def test_batched_and_dataloader_match_direct_indexing():
    ds = ShapesDataset(resolution=32, length=24, seed=5)
    direct = torch.stack([ds[i][0] for i in range(24)])
    labels = torch.tensor([ds[i][1] for i in range(24)])
    batched = ds.__getitems__(list(range(23, -1, -1)))[::-1]
    assert torch.equal(torch.stack([b[0] for b in batched]), direct)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    got = list(loader)
    assert torch.equal(torch.cat([x for x, _ in got]), direct)
    assert torch.equal(torch.cat([y for _, y in got]), labels)
