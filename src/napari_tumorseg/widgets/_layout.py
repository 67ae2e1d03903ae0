"""Dock layout: every dock of the plugin fits a 1920 x 1080 screen with the others open.

napari stacks plugin docks in one column; each asks for the height of its contents, and the
window grows past the screen when they do not fit (four docks needed 1759 px). Here a dock's
contents sit in a scroll area, which asks for little, and rarely used settings fold away in
sections the user opens.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QFormLayout,
    QFrame,
    QMainWindow,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

#: The least height a dock asks for (px): its title and two or three rows; the rest scrolls.
DOCK_MIN_HEIGHT = 140


class DockScrollArea(QScrollArea):
    """A vertical scroll area as wide as its contents: it asks for their width (the dock
    column would be too narrow for the buttons otherwise, with no horizontal scroll bar) and
    their height, but needs only `DOCK_MIN_HEIGHT` of it."""

    def setWidget(self, widget: QWidget) -> None:  # noqa: N802 -- Qt's name
        super().setWidget(widget)
        widget.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 -- Qt's name
        # Contents that grow after the dock was laid out (a long layer name chosen, a table
        # filled) ask the dock column for the width again; a scroll area alone does not pass
        # its contents' size on, and their right edge was cut off.
        if watched is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)

    def _width(self, inner: QSize) -> int:
        return inner.width() + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def sizeHint(self) -> QSize:  # noqa: N802 -- Qt's name
        inner = self.widget().sizeHint()
        return QSize(self._width(inner), inner.height() + 2 * self.frameWidth())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 -- Qt's name
        return QSize(self._width(self.widget().minimumSizeHint()), DOCK_MIN_HEIGHT)

    def showEvent(self, event) -> None:  # noqa: N802 -- Qt's name
        super().showEvent(event)
        QTimer.singleShot(0, lambda: balance_docks(self))


def name_box(characters: int = 16) -> QComboBox:
    """A combo box of layer or model names as wide as ``characters``, whatever the names: a
    long name ("my-model@v1 seg Brats18_TCIA01_378_1") otherwise widened the dock's contents
    past the dock column after it was laid out, cutting off their right edge. The whole name
    shows in the list and as the box's tooltip."""
    box = QComboBox()
    box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(characters)
    box.currentTextChanged.connect(box.setToolTip)
    return box


def balance_docks(area: QWidget) -> None:
    """Share the height of the dock column ``area``'s dock sits in among the plugin's docks
    there, in proportion to what each one's contents need.

    Qt gives a column's spare height to one dock (the first opened took 500 px for its three
    rows while the others were cut to their minimum); the window's own size and the user's
    later dragging of the splitters are left as they are."""
    try:
        window = area.window()
    except RuntimeError:  # deleted before the timer fired
        return
    dock = _dock_of(area)
    if not isinstance(window, QMainWindow) or dock is None:
        return
    side = window.dockWidgetArea(dock)
    ours = [
        d
        for d in window.findChildren(QDockWidget)
        if d.isVisible()
        and not d.isFloating()
        and window.dockWidgetArea(d) == side
        and d.findChild(DockScrollArea) is not None
    ]
    if len(ours) > 1:
        heights = [max(d.findChild(DockScrollArea).sizeHint().height(), 1) for d in ours]
        window.resizeDocks(ours, heights, Qt.Vertical)


def _dock_of(widget: QWidget) -> QDockWidget | None:
    while widget is not None and not isinstance(widget, QDockWidget):
        widget = widget.parentWidget()
    return widget


def scrolling_form(dock: QWidget) -> QFormLayout:
    """A form filling ``dock`` inside a scroll area; returns the form to add rows to."""
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    area = DockScrollArea(dock)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    # Expanding: napari adds no stretch under the dock, and the column shares its height.
    area.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
    inner = QWidget()
    form = QFormLayout(inner)
    form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    area.setWidget(inner)
    outer.addWidget(area)
    dock.scroll_area = area
    return form


class Section(QWidget):
    """A titled part of a dock that folds away: a header button and a form under it."""

    def __init__(self, title: str, expanded: bool = False, parent=None) -> None:
        super().__init__(parent)
        self.header = QToolButton(self)
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setChecked(expanded)
        self.header.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.body = QWidget(self)
        self.form = QFormLayout(self.body)
        self.form.setContentsMargins(8, 0, 0, 0)
        self.form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.header)
        layout.addWidget(self.body)
        self.header.toggled.connect(self.set_expanded)
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        self.header.setChecked(expanded)
        self.header.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.body.setVisible(expanded)
