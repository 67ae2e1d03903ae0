"""A small live plot of the training loss, drawn with QPainter (no plotting library)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget


class LossCurve(QWidget):
    """Loss against step; ``add(loss)`` appends a point and repaints."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.losses: list[float] = []
        self.setMinimumHeight(80)

    def clear(self) -> None:
        self.losses = []
        self.update()

    def add(self, loss: float) -> None:
        self.losses.append(float(loss))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(30, 30, 36))
        if len(self.losses) >= 2:
            low, high = min(self.losses), max(self.losses)
            span = max(high - low, 1e-6)
            w, h = self.width() - 8, self.height() - 16
            n = len(self.losses) - 1
            points = QPolygonF(
                [
                    QPointF(4 + w * i / n, 4 + h * (1 - (v - low) / span))
                    for i, v in enumerate(self.losses)
                ]
            )
            painter.setPen(QPen(QColor(255, 190, 60), 1.5))
            painter.drawPolyline(points)
        painter.setPen(QColor(200, 200, 200))
        text = f"loss {self.losses[-1]:.3f}  ({len(self.losses)} steps)" if self.losses else "loss"
        painter.drawText(self.rect().adjusted(4, 0, -4, -2), Qt.AlignBottom | Qt.AlignLeft, text)
        painter.end()
