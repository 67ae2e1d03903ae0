"""Orientation letters on the 2D canvas (R/L, A/P, S/I), as every radiology viewer shows them.

The plugin's layers live in LPS world space, (Z, Y, X) = (superior, posterior, left) growing
(`core.volume`). Which letters belong at the canvas's edges follows from the two displayed axes
and the camera's orientation: with napari's default view of an axial slice, anterior is at the
top and the patient's right on the left (the radiological convention).
"""

from __future__ import annotations

from napari.components.overlays import TextOverlay

#: World axis -> (letter at its low end, letter at its high end).
AXIS_LETTERS = {0: ("I", "S"), 1: ("A", "P"), 2: ("R", "L")}
#: Canvas edge -> overlay key (napari's canvas overlays are a dict).
EDGES = {
    "top_center": "tumorseg_top",
    "bottom_center": "tumorseg_bottom",
    "middle_left": "tumorseg_left",
    "middle_right": "tumorseg_right",
}
COLOR = (1.0, 0.65, 0.0, 1.0)


def edge_letters(order, ndisplay: int, vertical_down: bool = True, horizontal_right: bool = True):
    """Canvas edge -> letter for dims ``order`` (napari's `Dims.order`) when ``ndisplay`` is 2
    and the world has the 3 LPS axes; {} otherwise (3D view, other layers' dimensions).

    napari draws the first displayed axis downwards and the second rightwards unless the
    camera says otherwise (``vertical_down``, ``horizontal_right``)."""
    order = tuple(order)
    if ndisplay != 2 or len(order) != 3:
        return {}
    vertical, horizontal = order[-2], order[-1]
    top, bottom = AXIS_LETTERS[vertical] if vertical_down else AXIS_LETTERS[vertical][::-1]
    left, right = AXIS_LETTERS[horizontal] if horizontal_right else AXIS_LETTERS[horizontal][::-1]
    return {"top_center": top, "bottom_center": bottom, "middle_left": left, "middle_right": right}


def show_orientation(viewer) -> None:
    """Put the letters on ``viewer``'s canvas (once per viewer: every dock calls this) and keep
    them right as the displayed axes, the camera and the layers change.

    A letter is shown or hidden by its overlay's opacity (1 or 0)."""
    overlays = viewer.canvas.overlays
    if EDGES["top_center"] in overlays:
        return
    # Drawn from the start, at opacity 0 until they apply: their first drawing assembles their
    # shaders and lays the glyphs out (~0.5 s on 2 cores), better while the dock opens than
    # while the first exam's layers are added. Shown and hidden by opacity from then on.
    first = edge_letters((0, 1, 2), 2)
    for position, key in EDGES.items():
        overlays[key] = TextOverlay(
            text=first[position],
            position=position,
            color=COLOR,
            font_size=14,
            opacity=0.0,
            visible=True,
        )

    def update(event=None) -> None:
        camera = viewer.camera.orientation2d
        letters = edge_letters(
            viewer.dims.order,
            viewer.dims.ndisplay,
            vertical_down=str(camera[0]) == "down",
            horizontal_right=str(camera[1]) == "right",
        )
        # Only for 3D images in world mm: a 2D picture or a 4D stack has no such axes.
        if not any(getattr(layer, "ndim", 0) == 3 for layer in viewer.layers):
            letters = {}
        for position, key in EDGES.items():
            overlay = overlays[key]
            text, opacity = letters.get(position, overlay.text), float(bool(letters))
            if overlay.text != text:  # each new text is laid out again
                overlay.text = text
            if overlay.opacity != opacity:
                overlay.opacity = opacity

    viewer.dims.events.order.connect(update)
    viewer.dims.events.ndisplay.connect(update)
    viewer.camera.events.orientation.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    update()
