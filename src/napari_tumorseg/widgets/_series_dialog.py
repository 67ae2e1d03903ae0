"""The series picker: a DICOM study whose series the plugin cannot tell apart by itself.

A table of the study's scans (description, protocol, files), each with the sequence it is
taken as -- pre-set to what its description says, "-" for none -- so that the user picks,
e.g., which of two T2 series to use. OK reads the series chosen; Cancel opens nothing.
"""

from __future__ import annotations

from qtpy.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..core.dicom import SeriesChoiceNeeded
from ..core.io import SEQUENCES

NOT_USED = "-"
COLUMNS = ("use as", "series description", "protocol", "files", "series")


class SeriesDialog(QDialog):
    """Pick the sequence of each series of ``needed.candidates`` (`choice`)."""

    def __init__(self, needed: SeriesChoiceNeeded, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Choose the series of {needed.folder.name}")
        self.series = needed.candidates
        layout = QVBoxLayout(self)
        intro = QLabel(
            f"{needed.reason.capitalize()}. Choose the sequence each series is used as "
            f"({NOT_USED}: not used); each sequence at most once."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)
        self.table = QTableWidget(len(self.series), len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.boxes: list[QComboBox] = []
        taken: set[str] = set()
        for row, series in enumerate(self.series):
            box = QComboBox()
            box.addItems([NOT_USED, *SEQUENCES])
            guess = needed.guesses.get(series.uid)
            if guess and guess not in taken:  # a sequence's first series; the user swaps
                box.setCurrentText(guess)
                taken.add(guess)
            box.currentTextChanged.connect(self._check)
            self.boxes.append(box)
            self.table.setCellWidget(row, 0, box)
            cells = (
                series.tags.get("description", ""),
                series.tags.get("protocol", ""),
                str(len(series.files)),
                series.uid[-12:],
            )
            for column, text in enumerate(cells, start=1):
                item = QTableWidgetItem(text)
                item.setToolTip(series.uid if column == 4 else text)
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setStretchLastSection(True)
        layout.addWidget(self.table)
        # Wide enough to read every column, tall enough for every row (up to a screen's worth).
        table_width = (
            self.table.verticalHeader().width()
            + sum(self.table.columnWidth(c) for c in range(len(COLUMNS)))
            + 2 * self.table.frameWidth()
            + self.table.verticalScrollBar().sizeHint().width()
        )
        rows_height = (
            self.table.horizontalHeader().height()
            + sum(self.table.rowHeight(r) for r in range(len(self.series)))
            + 2 * self.table.frameWidth()
        )
        self.table.setMinimumWidth(min(table_width, 1200))
        self.table.setMinimumHeight(min(rows_height, 600))
        self.problem = QLabel("")
        self.problem.setWordWrap(True)
        layout.addWidget(self.problem)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)
        self._check()

    def choice(self) -> dict[str, str]:
        """Sequence -> series uid, as the table says now."""
        return {
            box.currentText(): series.uid
            for box, series in zip(self.boxes, self.series)
            if box.currentText() != NOT_USED
        }

    def _check(self, *_) -> None:
        used = [box.currentText() for box in self.boxes if box.currentText() != NOT_USED]
        twice = sorted({seq for seq in used if used.count(seq) > 1})
        problem = (
            f"{', '.join(twice)} chosen for more than one series"
            if twice
            else "choose at least one series"
            if not used
            else ""
        )
        self.problem.setText(problem)
        self.buttons.button(QDialogButtonBox.Ok).setEnabled(not problem)


def ask_series(needed: SeriesChoiceNeeded) -> dict[str, str] | None:
    """Ask the user (a modal dialog); their choice, or None when they cancelled."""
    dialog = SeriesDialog(needed)
    return dialog.choice() if dialog.exec_() == QDialog.Accepted else None
