"""Real Slicer MRML without the Slicer application (slicer-core), or Slicer's own when inside it.

Imports only ``slicer`` and ``vtk`` (never qt/ctk), and only when a function is called, so this
module imports fine where slicer-core is absent; using it there raises a clear ImportError.

Headless, ``create_headless_slicer`` wires what qSlicerCoreApplication would: a scene, the
application logic, the module logics (each given the application logic *before* the scene:
some logics look up their peers while the scene is being set), ``slicer.mrmlScene`` and a
``slicer.modules`` namespace so ``slicer.util`` helpers that call
``slicer.modules.<name>.logic()`` work, and the remote-IO/data-IO logics that .mrb needs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    'Real MRML outside 3D Slicer needs slicer-core: pip install "spinekneeseg[headless]". '
    "Never install it inside 3D Slicer, which already has its own."
)

# (slicer.modules attribute, Slicer module name, logic class name); the order is the order of
# creation: subject hierarchy and colours first, as other logics use them when they start.
_MODULE_LOGICS = (
    ("subjecthierarchy", "SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("colors", "Colors", "vtkSlicerColorLogic"),
    ("terminologies", "Terminologies", "vtkSlicerTerminologiesModuleLogic"),
    ("volumes", "Volumes", "vtkSlicerVolumesLogic"),
    ("segmentations", "Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("markups", "Markups", "vtkSlicerMarkupsLogic"),
    ("tables", "Tables", "vtkSlicerTablesLogic"),
)


def require_slicer():
    """Return the ``slicer`` module, or raise an ImportError that says how to get it."""
    try:
        import slicer
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    # The unrelated PyPI package "slicer" (0.0.8) also imports as `slicer`.
    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError(f"the installed 'slicer' package is not 3D Slicer's MRML. {INSTALL_HINT}")
    return slicer


def is_real_slicer() -> bool:
    """True inside the 3D Slicer application (which defines ``slicer.app``)."""
    try:
        import slicer
    except ImportError:
        return False
    return hasattr(slicer, "app")


class _Module:
    """Stands in for a qSlicerAbstractCoreModule: what ``slicer.modules.<name>`` must offer."""

    def __init__(self, name: str, logic):
        self.name = name
        self._logic = logic

    def logic(self):
        return self._logic


@dataclass
class SlicerContext:
    """A scene and the module logics that act on it (headless or Slicer's own)."""

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)  # slicer.modules attribute name -> logic
    headless: bool = True

    def logic(self, name: str):
        return self.logics[name.lower()]

    @property
    def volumes(self):
        return self.logics["volumes"]

    @property
    def segmentations(self):
        return self.logics["segmentations"]

    @property
    def markups(self):
        return self.logics["markups"]

    @property
    def tables(self):
        return self.logics["tables"]

    @property
    def colors(self):
        return self.logics["colors"]

    @property
    def subject_hierarchy(self):
        return self.logics["subjecthierarchy"]

    @property
    def terminologies(self):
        return self.logics["terminologies"]


@dataclass
class HeadlessSlicer(SlicerContext):
    """A headless application. A cache folder it made is removed by ``close``, or when the
    application is garbage-collected or the interpreter exits: keep the application (not only
    its scene) alive while the scene is in use."""

    cache_dir: Path | None = None
    io_logics: tuple = ()
    _remove_cache: object = None  # weakref.finalize for a cache folder this application made

    def activate(self) -> "HeadlessSlicer":
        """Point ``slicer.mrmlScene`` / ``slicer.modules`` at this application."""
        slicer = require_slicer()
        if is_real_slicer():  # never hijack a running Slicer's globals
            return self
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            **{attr: _Module(name, self.logics[attr]) for attr, name, _ in _MODULE_LOGICS})
        return self

    def clear_scene(self) -> None:
        """Remove every node; singletons (colour tables, interaction node) are kept."""
        self.scene.Clear(0)

    def close(self) -> None:
        self.scene.Clear(1)
        if self._remove_cache is not None:
            self._remove_cache()

    def __enter__(self) -> "HeadlessSlicer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _vtk_messages_off():
    """Silence vtkErrorMacro output while starting logics: headless, colour logic complains
    that there is no Slicer home folder and terminologies logic that Slicer's default
    terminology JSON files are absent. Both are expected and harmless here."""
    import vtk

    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)


CACHE_PREFIX = "spinekneeseg-mrml-"  # + machine tag + pid: a headless application's temporary folder


def cache_prefix() -> str:
    """This machine's caches' prefix: containers that share /tmp but not their pids must not sweep
    each other's live caches as those of gone processes."""
    from SpineKneeSegLib.core.atomic import machine_tag

    return f"{CACHE_PREFIX}{machine_tag()}-"


def sweep_dead_caches() -> list[Path]:
    """Remove the temporary folders of this machine's headless applications whose process is gone
    (killed); those of other machines sharing the folder are left alone."""
    from SpineKneeSegLib.core.atomic import sweep_stale

    return sweep_stale(Path(tempfile.gettempdir()), cache_prefix())


def create_headless_slicer(cache_dir: str | Path | None = None, activate: bool = True) -> HeadlessSlicer:
    """Build a fresh headless Slicer: scene + application logic + module logics + .mrb IO.

    ``cache_dir`` holds the remote-IO cache, where .mrb bundles are staged on write and
    unpacked on read; a temporary folder (removed by ``close``) when None.
    ``activate`` sets ``slicer.mrmlScene`` and ``slicer.modules`` to this application.
    """
    slicer = require_slicer()
    owns_cache = cache_dir is None
    if owns_cache:  # pid-tagged, so the next run can sweep those of runs that were killed
        sweep_dead_caches()
    cache = Path(tempfile.mkdtemp(prefix=f"{cache_prefix()}{os.getpid()}-")) if owns_cache else Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetTemporaryPath(str(cache))
    app_logic.SetMRMLScene(scene)
    with _vtk_messages_off():
        logics = {attr: _start_logic(slicer, cls, name, app_logic, scene, cache)
                  for attr, name, cls in _MODULE_LOGICS}
    app_logic.SetColorLogic(logics["colors"])
    io_logics = _wire_data_io(slicer, scene, app_logic, cache)
    app = HeadlessSlicer(scene, app_logic, logics, True, cache, io_logics)
    if owns_cache:  # callers that never close() (or crash) leave no folder behind
        app._remove_cache = weakref.finalize(app, shutil.rmtree, str(cache), True)
    _CONTEXTS[id(scene)] = app
    return app.activate() if activate else app


def _start_logic(slicer, class_name: str, module_name: str, app_logic, scene, cache: Path):
    logic = getattr(slicer, class_name)()
    if module_name == "Terminologies":
        # It loads Slicer's default terminologies from here; we register our own instead.
        share = cache / "terminologies"
        share.mkdir(exist_ok=True)
        logic.SetModuleShareDirectory(str(share))
        logic.SetUserContextsPath(str(share))
    logic.SetMRMLApplicationLogic(app_logic)  # before SetMRMLScene (see module docstring)
    logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic(module_name, logic)
    return logic


def _wire_data_io(slicer, scene, app_logic, cache: Path) -> tuple:
    """Remote-IO + data-IO logics give the scene a cache manager and data-IO manager,
    without which .mrb bundles cannot be written or read."""
    remote_io = slicer.vtkMRMLRemoteIOLogic()
    remote_io.SetMRMLScene(scene)
    remote_io.SetMRMLApplicationLogic(app_logic)
    remote_cache = cache / "remote-io"
    remote_cache.mkdir(exist_ok=True)
    remote_io.GetCacheManager().SetRemoteCacheDirectory(str(remote_cache))

    data_io = slicer.vtkDataIOManagerLogic()
    data_io.SetMRMLScene(scene)
    data_io.SetMRMLApplicationLogic(app_logic)
    data_io.SetAndObserveDataIOManager(remote_io.GetDataIOManager())
    remote_io.AddDataIOToScene()
    return remote_io, data_io


def _real_slicer_context() -> SlicerContext:
    """A thin view of the running Slicer's own scene and module logics."""
    import slicer

    logics = {attr: getattr(slicer.modules, attr).logic() for attr, _, _ in _MODULE_LOGICS}
    return SlicerContext(slicer.mrmlScene, slicer.app.applicationLogic(), logics, headless=False)


# Headless applications by scene, so adapter functions given only a scene find its logics.
# Keyed by the scene wrapper's id: VTK hands back that same wrapper while the app holds it.
_CONTEXTS: "weakref.WeakValueDictionary[int, SlicerContext]" = weakref.WeakValueDictionary()


def context_for_scene(scene) -> SlicerContext:
    """The application (headless or Slicer's own) whose module logics act on ``scene``."""
    if is_real_slicer():
        import slicer

        if scene is slicer.mrmlScene:
            return _real_slicer_context()
    context = _CONTEXTS.get(id(scene))
    if context is None or context.scene is not scene:
        raise ValueError("this MRML scene was not made by create_headless_slicer(), so its module "
                         "logics are unknown; create scenes through mrml_harness")
    return context


_APP: SlicerContext | None = None
# the headless application's one scene is shared: writers that clear and fill it (pipeline's
# write_outputs) hold this, so a batch's worker threads take turns
SCENE_LOCK = threading.RLock()


def get_app() -> SlicerContext:
    """Inside Slicer: its own scene and logics. Headless: one application, created once."""
    global _APP
    if is_real_slicer():
        return _real_slicer_context()
    if _APP is None:
        _APP = create_headless_slicer()
    return _APP


class HeadlessSliceView:
    """A slice view without Qt: a slice logic + node, Slicer's slice-view displayable managers
    (markups) in an offscreen render window, and ``vtkMRMLSliceViewInteractorStyle`` on its
    interactor, so simulated mouse and key events go through Slicer's own interaction code
    (placing, dragging, deleting markups points) exactly as clicks in a real view do.
    Headless only (tests); inside Slicer use its views. Never rendered, so no GPU is needed."""

    def __init__(self, app: SlicerContext, name: str = "Yellow", orientation: str = "Sagittal",
                 size: tuple[int, int] = (400, 400)):
        slicer = require_slicer()
        import vtk

        self._vtk = vtk
        self.app = app
        previous = vtk.vtkLogger.GetCurrentVerbosityCutoff()
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_ERROR)  # "no X server": EGL is used instead
        try:
            self.renderer = vtk.vtkRenderer()
            self.render_window = vtk.vtkRenderWindow()
        finally:
            vtk.vtkLogger.SetStderrVerbosity(previous)
        self.render_window.SetOffScreenRendering(1)
        self.render_window.AddRenderer(self.renderer)
        self.render_window.SetSize(*size)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())  # no camera moves of its own
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app.app_logic)
        if not factory.IsDisplayableManagerRegistered("vtkMRMLMarkupsDisplayableManager"):
            factory.RegisterDisplayableManager("vtkMRMLMarkupsDisplayableManager")
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        if app.app_logic.GetSliceLogics() is None:  # qSlicerCoreApplication makes this collection
            app.app_logic.SetSliceLogics(vtk.vtkCollection())
        app.app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(app.scene)
        self.slice_node = self.logic.AddSliceNode(name)
        self.slice_node.SetOrientation(orientation)
        self.managers.SetMRMLDisplayableNode(self.slice_node)
        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetDisplayableManagers(self.managers)
        self.style.SetSliceLogic(self.logic)
        self.style.SetInteractor(self.interactor)
        self.logic.ResizeSliceNode(*size)

    def show(self, volume_node, fit: bool = True) -> None:
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.slice_node.RotateToVolumePlane(volume_node)
        if fit:
            self.logic.FitSliceToBackground()

    def jump_to(self, ras) -> None:
        """Move the slice plane through ``ras`` (as scrolling to that slice does)."""
        self.slice_node.JumpSlice(*[float(v) for v in ras])

    def xy(self, ras) -> tuple[int, int]:
        """The view pixel (x, y) showing ``ras`` on the current plane."""
        m = self._vtk.vtkMatrix4x4()
        self._vtk.vtkMatrix4x4.Invert(self.slice_node.GetXYToRAS(), m)
        x, y, _, _ = m.MultiplyPoint((*[float(v) for v in ras], 1.0))
        return round(x), round(y)

    def ras(self, xy) -> tuple[float, float, float]:
        return tuple(self.slice_node.GetXYToRAS().MultiplyPoint((float(xy[0]), float(xy[1]), 0.0, 1.0))[:3])

    def _event(self, event: str, xy, keysym: str | None = None) -> None:
        self.interactor.SetEventInformation(int(xy[0]), int(xy[1]), 0, 0, "\0", 0, keysym)
        self.interactor.InvokeEvent(getattr(self._vtk.vtkCommand, event))

    def move(self, xy) -> None:
        self._event("MouseMoveEvent", xy)

    def click(self, xy) -> None:
        """Mouse move to ``xy``, left press, left release."""
        self.move(xy)
        self._event("LeftButtonPressEvent", xy)
        self._event("LeftButtonReleaseEvent", xy)

    def drag(self, start, end, steps: int = 4) -> None:
        self.move(start)
        self._event("LeftButtonPressEvent", start)
        for t in range(1, steps + 1):
            self.move((start[0] + (end[0] - start[0]) * t / steps, start[1] + (end[1] - start[1]) * t / steps))
        self._event("LeftButtonReleaseEvent", end)

    def key(self, keysym: str, xy) -> None:
        """Hover ``xy`` and press a key (e.g. "Delete" over a point deletes it)."""
        self.move(xy)
        for event in ("KeyPressEvent", "CharEvent", "KeyReleaseEvent"):
            self._event(event, xy, keysym)

    def close(self) -> None:
        self.style.SetInteractor(None)
        collection = self.app.app_logic.GetSliceLogics()
        if collection is not None:
            collection.RemoveItem(self.logic)
        self.managers.SetMRMLDisplayableNode(None)
        self.logic.SetMRMLScene(None)
        self.render_window.Finalize()
