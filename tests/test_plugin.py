"""The plugin inside napari: manifest, reader, writer, samples, widgets, what the user sees."""

import filecmp
from importlib import resources
from pathlib import Path

import nibabel as nib
import npe2
import numpy as np
import pytest

from napari_tumorseg.core.errors import TumorSegError
from napari_tumorseg.core.io import read_volume

from .conftest import BRATS, BRATS2023, ROOT, TCGA_RAW

PLUGIN = "napari-tumorseg"


def test_root_manifest_is_valid_and_is_the_one_napari_loads():
    manifest = npe2.PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == PLUGIN
    manifest.validate_imports()
    installed = Path(str(resources.files("napari_tumorseg") / "napari.yaml"))
    assert filecmp.cmp(installed, ROOT / "napari.yaml", shallow=False)
    assert npe2.PluginManifest.from_distribution(PLUGIN).display_name == manifest.display_name


def test_reader_and_samples_import_no_model_code():
    """napari imports the package, then the reader or the sample exams, on its main thread:
    torch, SciPy's image code and SimpleITK (seconds) wait until a model or a registration
    is used; the API's names still import from the package."""
    import subprocess
    import sys

    code = (
        "import sys, napari_tumorseg._reader, napari_tumorseg._sample_data\n"
        "heavy = sorted(m for m in ('torch', 'SimpleITK', 'napari_tumorseg.core.models') "
        "if m in sys.modules)\n"
        "from napari_tumorseg import TumorSegError, read_exam, segment, __all__\n"
        "import napari_tumorseg\n"
        "assert all(getattr(napari_tumorseg, name) is not None for name in __all__)\n"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_npe2_read_write_round_trip(tmp_path):
    npe2.PluginManager.instance().discover()
    layers = npe2.read(
        [str(BRATS / "Brats18_TCIA01_378_1_seg.nii.gz")], plugin_name=PLUGIN, stack=False
    )
    ((data, kwargs, kind),) = layers
    assert kind == "labels" and data.shape == (155, 240, 240)
    out = tmp_path / "saved_seg.nii.gz"
    npe2.write(str(out), [(data, kwargs, "labels")], plugin_name=PLUGIN)
    src = nib.load(str(BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"))
    dst = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj))
    np.testing.assert_array_equal(dst.affine, src.affine)


def test_exam_folder_opens_sequences_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open(str(BRATS), plugin=PLUGIN)
    names = [layer.name for layer in viewer.layers]
    assert names == ["t1", "t1ce", "t2", "flair", "Brats18_TCIA01_378_1 labels"]
    # Only the top scan is visible (it hides the others): napari slices and draws no other.
    visible = [layer.name for layer in viewer.layers if layer.visible]
    assert visible == ["flair", "Brats18_TCIA01_378_1 labels"]
    labels = viewer.layers[-1]
    assert labels._type_string == "labels"
    assert tuple(labels.colormap.map(4)[:3]) == pytest.approx((1.0, 0.85, 0.0))
    assert "ET" in list(labels.features["region"])


@pytest.mark.parametrize(("key", "n_layers"), [("brats2018", 5), ("tcga_raw", 4), ("brats2023", 4)])
def test_samples_load(make_napari_viewer, key, n_layers):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, key)
    assert len(viewer.layers) == n_layers
    for layer in viewer.layers:
        assert layer.ndim == 3 and layer.data.size > 0
    if key == "tcga_raw":
        # Unregistered: each sequence sits at its own world position.
        corners = {tuple(np.round(layer.translate, 1)) for layer in viewer.layers}
        assert len(corners) >= 3
        # Post-contrast T1 and FLAIR blended so that the misalignment shows.
        visible = [layer.name for layer in viewer.layers if layer.visible]
        assert visible == ["t1ce (raw)", "flair (raw)"]


def test_scans_hidden_at_opening_only_where_the_top_scan_covers_them():
    """An unregistered exam's scans lie on other grids: none is hidden behind the top one."""
    from napari_tumorseg._reader import read_layers

    layers, _ = read_layers([TCGA_RAW])
    assert [kwargs.get("visible", True) for _, kwargs, _ in layers] == [True] * 4
    layers, _ = read_layers(sorted(BRATS.glob("*_t*.nii.gz")))  # dropped together
    assert [kwargs["name"] for _, kwargs, _ in layers if kwargs.get("visible", True)] == [
        layers[-1][1]["name"]
    ]


def test_dropping_exams_together_or_twice_is_said(tmp_path):
    """Scans are named by sequence only: two exams dropped together, an exam dropped twice,
    or a label map over another exam's scans (same atlas grid) would be told apart by nothing."""
    from napari_tumorseg._reader import get_reader, read_layers
    from napari_tumorseg.core.errors import TumorSegError

    flair = next(BRATS.glob("*_flair.nii.gz"))
    other = next(BRATS2023.glob("*t2f.nii.gz"))
    _, warnings = read_layers([flair, other])
    assert any("belong to 2 exams" in w for w in warnings)
    _, warnings = read_layers([flair], open_scans=[read_volume(flair)])
    assert any("already open" in w and flair.name in w for w in warnings)
    seg = next(BRATS.glob("*_seg.nii.gz"))
    _, warnings = read_layers([seg], open_scans=[read_volume(other)])
    assert any("shown over the scans of exam BraTS-GLI-00001-000" in w for w in warnings)
    _, warnings = read_layers([seg], open_scans=[read_volume(flair)])
    assert warnings == []
    # The label map too: its edits would be split across two copies. An exam folder opened
    # twice (a sample, say) is one warning, not one per file.
    labels = read_volume(seg, kind="labels")
    _, warnings = read_layers([seg], open_scans=[read_volume(flair)], open_labels=[labels])
    assert len(warnings) == 1 and seg.name in warnings[0] and "already open" in warnings[0]
    scans = [read_volume(p) for p in sorted(BRATS.glob("*.nii.gz")) if p != seg]
    _, warnings = read_layers([BRATS], open_scans=scans, open_labels=[labels])
    assert len(warnings) == 1 and "and 4 more files: already open" in warnings[0]
    # An empty folder, or a folder of exam folders, is ours to explain (napari said only
    # "the reader refused the file").
    empty = tmp_path / "empty"
    empty.mkdir()
    assert get_reader(str(empty)) is not None and get_reader(str(ROOT / "sample_data"))
    with pytest.raises(TumorSegError, match=r"holds exam folders \(brats2018, brats2023"):
        read_layers([ROOT / "sample_data"])
    with pytest.raises(TumorSegError, match="holds no NIfTI scan"):
        read_layers([empty])
    assert get_reader(str(ROOT / "src")) is None  # folders of other things stay napari's


def test_a_probability_map_written_by_segment_opens_as_three_layers(tmp_path):
    """`tumorseg segment --prob` writes WT, TC and ET as one 4D file: dropped on napari it
    used to be refused ("save each sequence as its own 3D file")."""
    from napari_tumorseg._layers import scan_layer_data
    from napari_tumorseg._reader import read_layers
    from napari_tumorseg.core.errors import TumorSegError
    from napari_tumorseg.core.io import write_volume

    flair = read_volume(TCGA_RAW / "TCGA-FG-6692_flair_raw.nii.gz")  # oblique
    rng = np.random.default_rng(0)
    maps = rng.random((3, *flair.spatial_shape)).astype(np.float32)
    path = write_volume(tmp_path / "case_prob.nii.gz", maps, flair)
    layers, warnings = read_layers([path])
    assert warnings == [] and [kind for _, _, kind in layers] == ["image"] * 3
    assert [kwargs["name"] for _, kwargs, _ in layers] == [
        f"case_prob {r}" for r in "WT TC ET".split()
    ]
    # Colours that stay apart where the maps overlap (additive green + red made ET's
    # yellow): translucent, transparent at 0, each region's own colour at 1.
    colormaps = [kwargs["colormap"] for _, kwargs, _ in layers]
    assert [c.name for c in colormaps] == ["tumorseg WT", "tumorseg TC", "tumorseg ET"]
    assert all(kwargs["blending"] == "translucent" for _, kwargs, _ in layers)
    ends = [c.map(np.array([0.0, 1.0])) for c in colormaps]
    assert all(end[0, 3] == 0 and end[1, 3] == 1 for end in ends)
    assert len({tuple(np.round(end[1, :3], 2)) for end in ends}) == 3
    _, scan_kwargs, _ = scan_layer_data(flair)
    for index, (data, kwargs, _) in enumerate(layers):
        np.testing.assert_allclose(data, maps[index], atol=1e-6)
        for key in ("scale", "translate", "rotate"):
            np.testing.assert_allclose(kwargs[key], scan_kwargs[key], atol=1e-6)
    maps[1, 0, 0, 0] = 7.0  # not probabilities
    bad = write_volume(tmp_path / "bad_prob.nii.gz", maps, flair)
    with pytest.raises(TumorSegError, match="not probabilities"):
        read_layers([bad])


def test_raw_sequences_overlay_in_world_space(make_napari_viewer):
    """A scanner-space point maps to the same anatomy whatever layer it is read from."""
    viewer = make_napari_viewer()
    viewer.open(str(TCGA_RAW / "TCGA-FG-6692_t1_raw.nii.gz"), plugin=PLUGIN)
    viewer.open(str(TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"), plugin=PLUGIN)
    t1, t1ce = viewer.layers
    world = t1.data_to_world((13, 112, 128))
    vol_t1 = read_volume(TCGA_RAW / "TCGA-FG-6692_t1_raw.nii.gz")
    # napari world (Z, Y, X) is LPS (z, y, x) in mm
    lps = vol_t1.affine @ [128, 112, 13, 1]
    np.testing.assert_allclose(world, lps[:3][::-1], atol=1e-3)
    back = np.asarray(t1ce.world_to_data(world))
    vol_t1ce = read_volume(TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz")
    expected = np.linalg.solve(vol_t1ce.affine, lps)[:3][::-1]
    np.testing.assert_allclose(back, expected, atol=1e-2)


def test_widgets_listed_in_plugins_menu(make_napari_viewer):
    viewer = make_napari_viewer()
    menu = viewer.window.plugins_menu
    menu.aboutToShow.emit()
    texts = []
    for action in menu.actions():
        texts.append(action.text())
        if action.menu() is not None:
            texts += [a.text() for a in action.menu().actions()]
    from napari_tumorseg.widgets import DOCK_WIDGETS

    for name in DOCK_WIDGETS:
        assert any(name in text for text in texts), texts
        viewer.window.add_plugin_dock_widget(PLUGIN, name)


def test_bad_file_is_a_notification_not_a_crash(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    bad = tmp_path / "broken_t1.nii.gz"
    bad.write_bytes(b"not an image")
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    viewer.open(str(bad), plugin=PLUGIN)
    assert len(viewer.layers) == 0
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any(str(bad) in m and "NIfTI" in m for m in messages), messages


def test_labels_on_wrong_grid_are_refused(make_napari_viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    viewer.open(str(TCGA_RAW / "TCGA-FG-6692_t1c_raw.nii.gz"), plugin=PLUGIN)
    before = len(notification_manager.records)
    viewer.open(str(BRATS / "Brats18_TCIA01_378_1_seg.nii.gz"), plugin=PLUGIN)
    assert [layer._type_string for layer in viewer.layers] == ["image"]
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("matches none of the exam" in m for m in messages), messages


def test_screenshot_shows_labels_where_the_tumour_is(make_napari_viewer):
    """Axial view of the labelled sample: label colours appear over the tumour, on the correct
    side (radiological convention: patient's left on the viewer's right)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "brats2018")
    labels = viewer.layers[-1]
    labels.opacity = 1.0
    z_tumour = int(np.argmax((labels.data > 0).sum(axis=(1, 2))))
    viewer.dims.set_point(0, z_tumour)
    viewer.reset_view()
    shot_on = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    labels.visible = False
    shot_off = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)

    changed = np.abs(shot_on - shot_off).sum(axis=-1) > 30
    assert changed.sum() > 200
    red, green, blue = (shot_on[..., i] for i in range(3))
    oedema = changed & (green > 150) & (red < 100) & (blue < 100)  # label 2, green
    enhancing = changed & (red > 200) & (green > 150) & (blue < 80)  # label 4, yellow
    assert oedema.sum() > 50 and enhancing.sum() > 50

    # Where the tumour lies within the brain, in the screenshot and in the data, as fractions.
    brain = shot_off.sum(axis=-1) > 30
    rows, cols = np.nonzero(brain)
    t_rows, t_cols = np.nonzero(changed)
    data_brain = viewer.layers["flair"].data[z_tumour] > 0
    data_tumour = labels.data[z_tumour] > 0
    b_rows, b_cols = np.nonzero(data_brain)
    d_rows, d_cols = np.nonzero(data_tumour)

    def frac(v, lo, hi):
        return (v - lo) / (hi - lo)

    assert frac(t_cols.mean(), cols.min(), cols.max()) == pytest.approx(
        frac(d_cols.mean(), b_cols.min(), b_cols.max()), abs=0.05
    )
    assert frac(t_rows.mean(), rows.min(), rows.max()) == pytest.approx(
        frac(d_rows.mean(), b_rows.min(), b_rows.max()), abs=0.05
    )


def test_writer_uses_the_layer_transform_for_hand_made_labels(make_napari_viewer, tmp_path):
    """A labels layer drawn from scratch (no source file) is saved where it lies in the world."""
    viewer = make_napari_viewer()
    viewer.open(str(BRATS / "Brats18_TCIA01_378_1_flair.nii.gz"), plugin=PLUGIN)
    flair = viewer.layers[0]
    drawn = viewer.add_labels(
        np.zeros(flair.data.shape, np.uint8),
        scale=flair.scale,
        translate=flair.translate,
        name="drawn",
    )
    drawn.data_setitem((np.array([80]), np.array([100]), np.array([60])), 2)
    out = tmp_path / "drawn.nii.gz"
    viewer.layers.selection = {drawn}
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    saved = read_volume(out, kind="labels")
    np.testing.assert_allclose(
        saved.affine, read_volume(BRATS / "Brats18_TCIA01_378_1_flair.nii.gz").affine, atol=1e-4
    )
    assert saved.array[80, 100, 60] == 2 and saved.array.sum() == 2
    # ... and voxel for voxel like the scan it was drawn on (its header, not a fresh LPS one).
    flair_file = nib.load(str(BRATS / "Brats18_TCIA01_378_1_flair.nii.gz"))
    np.testing.assert_array_equal(nib.load(str(out)).affine, flair_file.affine)


def test_writer_refuses_labels_the_reader_would_refuse(tmp_path):
    """napari's "new label" picks 5: saving it would write a file that cannot be reopened."""
    from napari_tumorseg._writer import write_labels_layer
    from napari_tumorseg.core.errors import TumorSegError

    seg = read_volume(BRATS / "Brats18_TCIA01_378_1_seg.nii.gz", kind="labels")
    data = seg.array.copy()
    data[80, 100, 60] = 5
    attributes = {"name": "edited", "scale": (1, 1, 1), "translate": (0, 0, 0)}
    out = tmp_path / "edited_seg.nii.gz"
    with pytest.raises(TumorSegError, match="values 5"):
        write_labels_layer(str(out), data, attributes)
    assert not out.exists()


def test_the_writer_refuses_a_labels_layer_that_is_not_3d(tmp_path):
    """napari offers our writer for every labels layer: a 2D one got a raw ValueError."""
    from napari_tumorseg._writer import write_labels_layer

    for data in (np.zeros((4, 4), np.uint8), np.zeros((2, 3, 4, 4), np.uint8)):
        with pytest.raises(TumorSegError, match="is not a 3D"):
            write_labels_layer(str(tmp_path / "m.nii.gz"), data, {"name": "drawn"})
    assert not list(tmp_path.iterdir())


def test_a_dicom_study_dropped_on_napari_opens_its_four_sequences(make_napari_viewer, tmp_path):
    from napari_tumorseg.core.io import SEQUENCES, read_exam

    from .core.test_dicom import DESCRIPTIONS, write_series

    exam = read_exam(BRATS)
    for i, seq in enumerate(SEQUENCES):
        write_series(exam.scans[seq], tmp_path / "study" / f"series{i}", DESCRIPTIONS[seq])
    import locale

    viewer = make_napari_viewer()
    before = locale.setlocale(locale.LC_ALL, None)
    viewer.open(str(tmp_path / "study"), plugin="napari-tumorseg")
    # GDCM set the C locale and left it (Python then decoded text as ASCII): put back.
    assert locale.setlocale(locale.LC_ALL, None) == before
    assert [layer.name for layer in viewer.layers] == list(SEQUENCES)
    for seq in SEQUENCES:
        np.testing.assert_array_equal(viewer.layers[seq].data, exam.scans[seq].array)
        transform = exam.scans[seq].layer_transform()
        np.testing.assert_allclose(viewer.layers[seq].scale, transform["scale"], atol=1e-6)
        np.testing.assert_allclose(viewer.layers[seq].translate, transform["translate"], atol=1e-4)


def test_a_study_the_plugin_cannot_sort_out_asks_which_series(
    make_napari_viewer, tmp_path, monkeypatch, qtbot
):
    from napari_tumorseg.core.io import SEQUENCES, read_exam
    from napari_tumorseg.widgets import _series_dialog

    from .core.test_dicom import DESCRIPTIONS, write_series

    exam = read_exam(BRATS)
    study = tmp_path / "study"
    for i, seq in enumerate(SEQUENCES):
        write_series(exam.scans[seq], study / f"series{i}", DESCRIPTIONS[seq])
    write_series(exam.scans["t1"], study / "repeat", "T2 TSE axial repeat")  # mislabelled

    # The dialog the user sees: one of the two T2 series pre-set, the other not used.
    asked = []

    def ask(needed):
        dialog = _series_dialog.SeriesDialog(needed)
        qtbot.addWidget(dialog)
        rows = {s.tags["description"]: box for s, box in zip(dialog.series, dialog.boxes)}
        first, repeat = rows[DESCRIPTIONS["t2"]], rows["T2 TSE axial repeat"]
        assert sorted([first.currentText(), repeat.currentText()]) == ["-", "t2"]
        ok = dialog.buttons.button(_series_dialog.QDialogButtonBox.Ok)
        first.setCurrentText("t2")
        repeat.setCurrentText("t2")  # t2 twice: OK says no
        assert not ok.isEnabled() and "t2" in dialog.problem.text()
        first.setCurrentText(_series_dialog.NOT_USED)  # the user takes the repeat
        assert ok.isEnabled() and not dialog.problem.text()
        asked.append(dialog.choice())
        return asked[-1] if len(asked) == 1 else None  # the second time: Cancel

    monkeypatch.setattr(_series_dialog, "ask_series", ask)
    viewer = make_napari_viewer()
    viewer.open(str(study), plugin="napari-tumorseg")
    assert [layer.name for layer in viewer.layers] == list(SEQUENCES)
    # The series chosen for t2 is the repeat (which holds the T1 voxels).
    np.testing.assert_array_equal(viewer.layers["t2"].data, exam.scans["t1"].array)
    viewer.layers.clear()
    viewer.open(str(study), plugin="napari-tumorseg")  # cancelled: nothing opened
    assert len(viewer.layers) == 0 and len(asked) == 2
