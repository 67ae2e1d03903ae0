"""A small live plot of the training loss, drawn with QPainter (no plotting library)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QWidget


class LossCurve(QWidget):
    """Loss against step; ``add(loss, step)`` appends a point and repaints."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.losses: list[float] = []
        self.step = 0
        self.setMinimumHeight(70)

    def clear(self) -> None:
        self.losses = []
        self.step = 0
        self.update()

    def add(self, loss: float, step: int | None = None) -> None:
        """A point; ``step`` is its step (or iteration) number, by default the point count."""
        self.losses.append(float(loss))
        self.step = len(self.losses) if step is None else int(step)
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
        elif self.losses:  # the first step: a point, so the curve shows from the start
            painter.setPen(QPen(QColor(255, 190, 60), 4))
            painter.drawPoint(QPointF(4, 4))
        painter.setPen(QColor(200, 200, 200))
        text = f"loss {self.losses[-1]:.3f}  (step {self.step})" if self.losses else "loss"
        painter.drawText(self.rect().adjusted(4, 0, -4, -2), Qt.AlignBottom | Qt.AlignLeft, text)
        painter.end()
