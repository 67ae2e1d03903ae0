"""Run a core generator in napari's thread worker with a progress bar, Cancel and clean errors.

Every long job of the plugin (registration, segmentation, fine-tuning) is a generator in `core`
that yields progress and returns a result; this wraps one in ``thread_worker`` so the viewer
stays responsive. Layers are only touched in the callbacks, which run on the main thread.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from functools import partial

from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QLabel, QProgressBar

from .._notify import notify
from ..core.errors import TumorSegError

#: Milliseconds between two steps of `run_in_turns` (and before the first): time for the viewer
#: to paint and take input. A zero-delay timer can fire before input and other timers that fell
#: due during the previous step, which then wait for both steps.
TURN_MS = 15
#: Speed (percent) of napari's animated "in progress" indicator while one of our jobs runs.
SPINNER_SPEED = 25
#: Seconds between two updates of napari's progress bar for a job (the dock's moves each time).
NAPARI_BAR_S = 0.5
#: Steps of a dock's progress bar (a 3D window's convolutions, a second of a fine-tune's
#: budget move it).
PROGRESS_STEPS = 1000


def run_in_turns(
    steps: Iterable[Callable[[], object]], on_error: Callable[[Exception], None] | None = None
) -> None:
    """Call ``steps`` on the main thread, one per turn of the event loop, ``TURN_MS`` apart.

    Adding a napari layer stalls the viewer (100-300 ms measured on 2 cores with software
    rendering); adding four in one callback stalls it four times as long. One step per turn
    lets the viewer repaint and handle input in between. The first step waits ``TURN_MS`` too:
    the caller (a button's click, a worker's signal) has just held the event loop itself. A step
    that returns a list of steps has them run next, one per turn (`add_layer_in_turns`).

    A step that raises ends the sequence: the steps after it are dropped and ``on_error`` gets
    the exception (without one it propagates, as from any Qt callback). A step whose widget
    was deleted in between (the dock or the viewer closed) ends it quietly.
    """
    pending = list(steps)

    def next_step() -> None:
        if not pending:
            return
        try:
            more = pending.pop(0)()
        except Exception as exc:
            pending.clear()
            if isinstance(exc, RuntimeError) and "has been deleted" in str(exc):
                return  # Qt's "wrapped C/C++ object ... has been deleted": the dock is gone
            if on_error is None:
                raise
            on_error(exc)
            return
        if isinstance(more, list):
            pending[:0] = more
        if pending:
            QTimer.singleShot(TURN_MS, next_step)

    QTimer.singleShot(TURN_MS, next_step)


def result_not_shown(title: str, status: QLabel) -> Callable[[Exception], None]:
    """A `run_in_turns` ``on_error`` for the steps that show a finished job's result: says so
    in a notification headed ``title`` and in the dock's ``status`` label."""

    def on_error(exc: Exception) -> None:
        reason = exc.headline if isinstance(exc, TumorSegError) else f"{type(exc).__name__}: {exc}"
        text = f"the result could not be shown: {reason}"
        notify(text, title)
        status.setText(text)

    return on_error


#: A labels layer's editing overlays (napari 0.9: the polygon tool and the brush stroke).
#: napari builds an overlay's visuals when it becomes visible: for these two, about 30 of the
#: 90 ms that adding a labels layer stalls the viewer (2 cores, software rendering).
EDIT_OVERLAYS = ("polygon", "brush_stroke")


def add_layer_in_turns(
    widget, make: Callable, added: Callable, select: bool = True
) -> Callable[[], list | None]:
    """A `run_in_turns` step that adds the napari layer ``make()`` returns to ``widget.viewer``,
    its stall split over event-loop turns; ``added(layer)`` is called once it is in the viewer.

    Turn 1 makes the layer (5-15 ms); turn 2 adds it with the repaint held back
    (`repaint_next_turn`), a labels layer's editing overlays hidden and the selection left as
    it is; one more turn each shows an overlay again (which is when napari builds its visuals)
    and, with ``select``, makes the layer the selected one (10-15 ms: napari switches the layer
    controls). After the last turn the layer is what ``viewer.add_layer`` alone makes (less the
    selection, without ``select``). ``make`` may return None: nothing to add.
    """

    def construct() -> list | None:
        layer = make()
        if layer is None:
            return None
        overlays = getattr(layer, "_overlays", {})  # napari's, private: absent means no split
        hidden = [overlays[k] for k in EDIT_OVERLAYS if k in overlays and overlays[k].visible]
        for overlay in hidden:
            overlay.visible = False

        selected = []

        def add() -> None:
            layers = widget.viewer.layers
            selected.append(_unwrapped(layers.selection.active))
            with repaint_next_turn(widget), _selection_kept(layers):
                widget.viewer.add_layer(layer)
            added(layer)

        def make_selected() -> None:
            layers = widget.viewer.layers
            # Not if the user picked a layer meanwhile: theirs stays selected.
            if layer in layers and _unwrapped(layers.selection.active) is selected[0]:
                layers.selection.active = layer

        shows = [partial(setattr, overlay, "visible", True) for overlay in hidden]
        return [add, *shows, *([make_selected] if select else [])]

    return construct


def _unwrapped(obj):
    """The napari object behind the PublicOnlyProxy a plugin dock sees (or ``obj`` itself)."""
    return getattr(obj, "__wrapped__", obj)


@contextmanager
def _selection_kept(layers):
    """Inside: a layer added to ``layers`` (napari's LayerList) is not made the selected one.

    napari's own switch for it is private (``_activate_on_insert``); the viewer a plugin dock
    is given wraps the list in a proxy that warns on private access (and is to refuse it), so
    the switch is set on the list itself, and only where this napari has it -- elsewhere the
    new layer is selected, as by a plain add.
    """
    real = _unwrapped(layers)
    if not isinstance(getattr(real, "_activate_on_insert", None), bool):
        yield
        return
    activate = real._activate_on_insert
    real._activate_on_insert = False
    try:
        yield
    finally:
        real._activate_on_insert = activate


@contextmanager
def repaint_next_turn(widget):
    """Hold back the repaint of ``widget``'s window until the next event-loop turn.

    Adding a napari layer takes 70-80 ms and the window repaint it triggers another 40-55 ms
    (2 cores, software rendering); Qt runs that repaint before any timer or input of the same
    turn, so together they stalled the viewer for 105-146 ms. With the window's updates off
    during the add, the two fall into separate turns: 94-107 ms and about 55 ms measured. The
    updates come back ``TURN_MS`` later, not at once: a zero-delay timer could run before the
    input and timers that fell due during the add, and the repaint would hold them too.
    """
    window = widget.window()
    window.setUpdatesEnabled(False)
    try:
        yield
    finally:
        QTimer.singleShot(TURN_MS, lambda: _enable_updates(window))


def _enable_updates(window) -> None:
    try:
        window.setUpdatesEnabled(True)
    except RuntimeError:  # the window was closed in between
        pass


def slow_spinners(widget) -> list:
    """Slow the animated indicators (QMovie labels, e.g. napari's "activity" spinner) in
    ``widget``'s window to `SPINNER_SPEED` percent; returns ``(movie, old speed)`` pairs.

    The spinner plays about 33 frames a second while a napari progress bar exists. With
    software OpenGL (llvmpipe: virtual machines, remote desktops, this CI machine) every frame
    re-composes the whole window on the CPU: measured on 2 cores, a 20 s fine-tune in the
    viewer managed 15 steps against 25 with no spinner, 23 at 25% speed.
    """
    slowed = []
    for label in widget.window().findChildren(QLabel):
        movie = label.movie()
        if movie is not None and movie.speed() > SPINNER_SPEED:
            slowed.append((movie, movie.speed()))
            movie.setSpeed(SPINNER_SPEED)
    return slowed


def exempt_live_objects(viewer) -> None:
    """Exempt the objects alive now from Python's cyclic garbage collector (`gc.freeze`) until
    a layer is removed from ``viewer`` (then `gc.unfreeze`).

    A full collection walks every tracked object with the GIL held: in napari that is about
    400,000 objects and 136-161 ms measured on 2 cores, and the layers a job adds make one
    likely (benchmarks/bench_viewer.py: the one stall over 100 ms of a run). The objects alive
    at a job's start -- napari's own, the open layers -- live on anyway; frozen, collections
    walk only what was made since, during the job and after it.

    Freezing keeps nothing alive that reference counting frees; only garbage held in reference
    cycles waits while frozen. The large such garbage is a removed layer (its events and
    callbacks hold cycles): removing a layer unfreezes everything (so does the end of one of our
    docks: a napari window closed by its button keeps its layers), and no job freezes again
    until a full collection has run since (`_collected`), so a removed layer is never frozen
    again before it could be freed. Young garbage is collected before freezing (`gc.collect(1)`,
    a few milliseconds). Without a viewer nothing would ever unfreeze: nothing is frozen.
    """
    if viewer is None:
        return
    viewer.layers.events.removed.connect(_unfreeze)  # napari ignores a second connect
    if _awaiting_collection:
        return
    gc.collect(1)
    gc.freeze()


_awaiting_collection = False


def _unfreeze(event=None) -> None:
    global _awaiting_collection
    if gc.get_freeze_count():
        gc.unfreeze()
        _awaiting_collection = True


def _collected(phase: str, info: dict) -> None:
    global _awaiting_collection
    if phase == "stop" and info.get("generation") == 2:
        _awaiting_collection = False


gc.callbacks.append(_collected)


class JobError(Exception):
    """Carries a job's RuntimeError (its ``__cause__``) through superqt's worker, which would
    otherwise swallow it."""


class _RemovalWatcher(QObject):
    """Calls ``on_removed`` when ``widget`` is taken out of its window (its parent set to
    None: napari's `remove_dock_widget`, the dock's close button)."""

    def __init__(self, widget, on_removed: Callable[[], None]) -> None:
        super().__init__(widget)
        self._on_removed = on_removed
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 -- Qt's name
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            self._on_removed()
        return False


class Runner:
    """One job at a time: start, cancel, and napari's progress bar.

    Parameters
    ----------
    description : str
        Label of napari's progress bar (Activity dock).
    on_start_stop : callable(bool)
        Called with True when a job starts and False when it ends (enable/disable buttons).
    owner : QWidget, optional
        The dock: its window's spinner is slowed while a job runs, and closing it cancels.
    bar : QProgressBar, optional
        A progress bar in the dock, moved with napari's (which sits in the Activity panel,
        folded away by default); shown while a job runs.
    """

    def __init__(
        self,
        description: str,
        on_start_stop: Callable[[bool], None],
        owner=None,
        bar: QProgressBar | None = None,
    ) -> None:
        self.description = description
        self.bar = bar
        self.cancelling = False
        if bar is not None:
            bar.hide()
        self.on_start_stop = self._quiet(on_start_stop)
        self.owner = owner  # the dock widget: its window's spinner is slowed while a job runs
        if owner is not None:
            # A window closed by its button keeps its layers: its docks' end unfreezes too.
            owner.destroyed.connect(_unfreeze)
            # A dock closed by its title bar's button (napari takes it out of the window) stops
            # its job: nothing would show its progress or offer Cancel any more.
            self._watcher = _RemovalWatcher(owner, self.cancel)
        self._slowed: list = []
        self.worker = None
        self._progress = None
        self._generator = None
        self._job = None
        self._delivered = None
        self._napari_updated = 0.0

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        generator: Generator,
        on_yield: Callable,
        on_return: Callable,
        on_cancel: Callable[[], None] | None = None,
        on_fail: Callable[[], None] | None = None,
        total: int = 100,
        prepare: Iterable[Callable[[], object]] = (),
    ):
        """Run ``generator`` in a worker thread; callbacks run on the main thread.

        ``prepare`` steps (e.g. adding the layers the job fills) run first, one per event-loop
        turn (`run_in_turns`); the worker starts after the last one. A step that raises ends the
        job as failed (``on_fail``, a notification) before the worker starts.
        """
        if self.worker is not None:
            raise RuntimeError("a job is already running")
        self._generator = generator
        self._progress = progress(total=total, desc=self.description)
        if self.owner is not None:
            self._slowed = slow_spinners(self.owner)
            exempt_live_objects(getattr(self.owner, "viewer", None))
        outcome: list = []

        def work():
            try:
                result = yield from generator
            except RuntimeError as exc:
                # superqt takes a RuntimeError for a deleted Qt object and only warns: no
                # ``errored``, no ``finished``, and the dock would wait for ever.
                raise JobError(exc) from exc
            outcome.append(result)
            return result

        # Errors go to `_failed` (a clear notification), not re-raised into the event loop.
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        job = self._job = object()
        # Events still queued when the job was cancelled are dropped: the caller's layers may
        # already have been restored.
        on_yield, on_return = self._quiet(on_yield), self._quiet(on_return)
        on_fail = self._quiet(on_fail) if on_fail is not None else None
        worker.yielded.connect(lambda event: self._job is job and on_yield(event))
        worker.returned.connect(lambda result: self._returned(job, result, on_return))
        worker.aborted.connect(self._close_generator)
        if on_cancel is not None:
            worker.aborted.connect(self._quiet(on_cancel))
        worker.errored.connect(lambda exc: self._failed(exc, on_fail))
        worker.finished.connect(lambda: self._finished(job, outcome, on_return))
        self.worker = worker
        self.cancelling = False
        if self.bar is not None:
            self.bar.setRange(0, total)
            self.bar.setValue(0)
            self.bar.setFormat(f"{self.description} ...")
            self.bar.show()
        self.on_start_stop(True)

        def prepare_failed(exc: Exception) -> None:
            # The worker never started: no signal will come, so the job ends here.
            self._failed(exc, on_fail)
            self._finished(job, [], on_return)

        run_in_turns([*prepare, worker.start], on_error=prepare_failed)
        return worker

    def _quiet(self, callback: Callable) -> Callable:
        """``callback``, made to end the job quietly when its widget was deleted (the viewer
        window closed while a job ran: Qt's "wrapped C/C++ object ... has been deleted")."""

        def call(*args):
            try:
                return callback(*args)
            except RuntimeError as exc:
                if "has been deleted" not in str(exc):
                    raise
                self.cancel()
                return None

        return call

    def set_progress(self, done: int, total: int | None = None, text: str | None = None) -> None:
        """Move napari's progress bar (call from a ``yielded`` callback)."""
        bar = self._progress
        if bar is None or self.cancelling:
            return
        # The dock's bar first: napari's may run the event loop (its Activity panel), and a
        # later event handled in there must not be overwritten by this one.
        if self.bar is not None:
            if total is not None and total != self.bar.maximum():
                self.bar.setRange(0, total)
            self.bar.setValue(min(done, self.bar.maximum()))
            self.bar.setFormat(f"{text}  %p%" if text else "%p%")
        # napari's bar (folded away in its Activity panel by default) at most every
        # `NAPARI_BAR_S`: each update repaints it, on the CPU the job runs on.
        now = time.perf_counter()
        if now - self._napari_updated < NAPARI_BAR_S and done < (total or bar.total):
            return
        self._napari_updated = now
        if total is not None and total != bar.total:
            bar.total = total
        bar.n = done
        if text:
            bar.set_description(f"{self.description}: {text}")
        bar.refresh()

    def cancel(self) -> None:
        """Ask the job to stop; it stops at its next yield (a convolution, a training step,
        a registration iteration: within a second or two). Until it has, the progress bars
        say "cancelling..." and no longer move."""
        worker = self.worker
        if worker is not None:
            self._job = None
            self.cancelling = True
            worker.quit()
            # The dock's bar only: napari's may run the event loop when it changes, and a
            # caller of cancel() must not see the job end inside the call.
            if self.bar is not None:
                self.bar.setFormat("cancelling...")

    def _close_generator(self) -> None:
        # The worker left its loop at a yield: the generator is suspended and can be closed
        # here, which runs its cleanup (e.g. stops a SimpleITK optimiser thread).
        if self._generator is not None:
            self._generator.close()

    def _returned(self, job, result, on_return) -> None:
        self._delivered = job
        on_return(result)

    def _failed(self, exc: Exception, on_fail) -> None:
        if isinstance(exc, JobError):
            exc = exc.__cause__
        if isinstance(exc, TumorSegError):
            notify(exc, self.description)
        else:
            notify(f"{self.description} failed: {type(exc).__name__}: {exc}")
        if on_fail is not None:
            on_fail()

    def _finished(self, job, outcome: list, on_return) -> None:
        # A Cancel that came after the job's last step: superqt then sends neither
        # ``aborted`` nor ``returned``, but the job did finish (a fine-tuned model may already
        # be saved), so its result is delivered as if Cancel had not been pressed.
        if outcome and self._delivered is not job:
            self._returned(job, outcome[0], on_return)
        for movie, speed in self._slowed:
            movie.setSpeed(speed)
        self._slowed = []
        if self._progress is not None:
            self._progress.close()
        self._progress = None
        self._generator = None
        self.worker = None
        self.cancelling = False
        if self.bar is not None:
            try:
                self.bar.hide()
            except RuntimeError:  # the dock was deleted (its window closed)
                pass
        self.on_start_stop(False)


class Background:
    """One short computation at a time off the main thread, for a dock's buttons.

    Clean-up, thresholds, the uncertainty map and evaluation each held the viewer for 1-4 s on
    2 cores. Here ``compute()`` runs in a worker thread and ``done(result)`` on the main thread,
    which only puts the result in place; the dock's ``buttons`` are disabled meanwhile, so
    that a second click cannot apply a result twice, and ``status`` says what runs.
    """

    def __init__(self, title: str, buttons: Iterable, status: QLabel) -> None:
        self.title = title
        self.buttons = list(buttons)
        self.status = status
        self.worker = None

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self, what: str, compute: Callable[[], object], done: Callable[[object], None]):
        """Run ``compute`` in a worker thread, then ``done`` with its result; returns the
        worker, or None while another computation runs."""
        if self.worker is not None:
            return None
        worker = create_worker(compute, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        self._enable(False)
        self.status.setText(f"{what} ...")

        def returned(result) -> None:
            try:
                done(result)
            except TumorSegError as exc:
                self._failed(exc)
            except RuntimeError as exc:
                if "has been deleted" not in str(exc):
                    raise

        worker.returned.connect(returned)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        worker.start()
        return worker

    def _failed(self, exc: Exception) -> None:
        text = exc.headline if isinstance(exc, TumorSegError) else f"{type(exc).__name__}: {exc}"
        notify(text, self.title)
        try:
            self.status.setText(text)
        except RuntimeError:  # the dock was deleted
            pass

    def _finished(self) -> None:
        self.worker = None
        try:
            self._enable(True)
        except RuntimeError:  # the dock was deleted
            pass

    def _enable(self, enabled: bool) -> None:
        for button in self.buttons:
            button.setEnabled(enabled)
