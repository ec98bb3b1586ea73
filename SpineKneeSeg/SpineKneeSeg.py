"""SpineKneeSeg scripted module: thin Qt layer over SpineKneeSegLib (all logic lives there).

Runs happen in a separate process (QProcess) executing the same CLI as the command line
(`PythonSlicer -m SpineKneeSegLib.cli run ... --progress json`), so Slicer never freezes and the
code path is the one the tests cover. Only this file needs Qt; it is not testable headless.
"""
import importlib.util
import os
import shutil
import sys
import tempfile

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

sys.path.insert(0, os.path.dirname(__file__))  # SpineKneeSegLib sits beside this file


class SpineKneeSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SpineKneeSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineKneeSeg contributors"]
        self.parent.helpText = ("Knee bones, lumbar levels and foramina, brain lesions and X-ray femur "
                                "segmentation. Choose a task and an input volume, then Apply.")
        self.parent.acknowledgementText = "Data sources and licences: see the extension README."
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Sample Data module: the small real scans in Resources/SampleData (README.md there)."""
    import SampleData
    from SpineKneeSegLib.core.datasets import sample_data_sources

    for source in sample_data_sources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


class SpineKneeSegLogic:
    """Plain class (ScriptedLoadableModuleLogic imports qt): Slicer's getModuleLogic reads widget.logic."""

    def __init__(self):
        from SpineKneeSegLib.panel.controller import PanelController

        self.controller = PanelController()

    def input_files(self, volume_nodes, folder):
        from SpineKneeSegLib.mrml.results import input_paths

        database = getattr(slicer, "dicomDatabase", None)
        return input_paths(volume_nodes, folder, database.fileForInstance if database else None)

    def import_results(self, output_dir, reference_volume, task, segmentation_node=None):
        from SpineKneeSegLib.mrml.results import load_results

        return load_results(slicer.mrmlScene, output_dir, reference_volume, task, segmentation_node)


class SpineKneeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from SpineKneeSegLib.engine.devices import CHOICES, detect_devices
        from SpineKneeSegLib.panel.parameters import load_settings
        from SpineKneeSegLib.tasks import TASKS

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SpineKneeSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineKneeSegLogic()
        self.controller = self.logic.controller
        self.process, self.workdir, self.results, self._updating = None, None, None, False
        for name, card in TASKS.items():
            self.ui.taskSelector.addItem(card.title, name)
        self.ui.deviceSelector.addItems(list(CHOICES))
        self.controller.set_devices(*detect_devices(), initial=True)
        load_settings(self.controller, qt.QSettings())
        for signal in (self.ui.taskSelector.currentIndexChanged, self.ui.deviceSelector.currentIndexChanged,
                       self.ui.inputVolumeSelector.currentNodeChanged,
                       self.ui.secondInputVolumeSelector.currentNodeChanged,
                       self.ui.outputSegmentationSelector.currentNodeChanged, self.ui.fastModeCheckBox.toggled,
                       self.ui.bfloat16CheckBox.toggled, self.ui.weightsDirPathLineEdit.currentPathChanged):
            signal.connect(self.onGUIChanged)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.ui.resultsTableView.clicked.connect(self.onResultRowClicked)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneChanged)
        self.setupAnnotate()
        self.onSceneChanged()

    # ---- Annotate section: buttons and shortcuts -> AnnotatePanel (Lib, tested headless) ----
    def setupAnnotate(self):
        from SpineKneeSegLib.annotation.controller import BUTTONS, SHORTCUTS, AnnotatePanel
        from SpineKneeSegLib.mrml.harness import get_app

        self.annotator = AnnotatePanel(get_app(), on_change=self.refreshAnnotate)
        for name, command in BUTTONS.items():
            getattr(self.ui, name).clicked.connect(lambda *_, c=command: self.annotate(c))
        self.ui.openWorklistButton.clicked.connect(
            lambda: self.annotate("open_worklist", self.ui.worklistPathLineEdit.currentPath))
        self.ui.caseList.itemDoubleClicked.connect(lambda *_: self.annotate("open_case", self.ui.caseList.currentRow))
        self.ui.foramenList.itemClicked.connect(lambda *_: self.annotate("jump", self.ui.foramenList.currentRow))
        self.ui.advanceCheckBox.toggled.connect(lambda on: self.annotate("set_advance", on))
        self.ui.saveCorrectionButton.clicked.connect(lambda: self.annotate(
            "save_correction", self.ui.outputSegmentationSelector.currentNode(),
            self.ui.inputVolumeSelector.currentNode(), self.ui.taskSelector.currentData))
        self.shortcuts = []
        for keys, command in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.connect("activated()", lambda c=command: self.annotate(c))
            self.shortcuts.append(shortcut)
        self.refreshAnnotate()

    def annotate(self, command, *args):
        self.annotator.run(command, *args)
        if command.endswith(("_case", "_worklist")) and self.annotator.volume_node is not None:
            self.ui.inputVolumeSelector.setCurrentNode(self.annotator.volume_node)  # for Apply / corrections

    def enter(self):  # the shortcuts act only while this module is shown
        for shortcut in getattr(self, "shortcuts", []):
            shortcut.enabled = True

    def exit(self):
        for shortcut in getattr(self, "shortcuts", []):
            shortcut.enabled = False

    def refreshAnnotate(self):
        view = self.annotator.view()
        for widget, rows, row in ((self.ui.caseList, view.cases, view.case_row),
                                  (self.ui.foramenList, view.foramina, view.foramen_row)):
            widget.blockSignals(True)
            widget.clear()
            widget.addItems(rows)
            widget.setCurrentRow(row)
            widget.blockSignals(False)
        self.ui.caseLabel.text = view.case_text
        self.ui.currentForamenLabel.text = view.current
        self.ui.annotateStatusLabel.text = view.message
        for name, enabled in view.enabled.items():
            getattr(self.ui, name).enabled = enabled

    def cleanup(self):
        self.removeObservers()
        if self.process is not None:
            from SpineKneeSegLib.panel.runner import kill_process_tree

            kill_process_tree(int(self.process.processId()))
        for shortcut in getattr(self, "shortcuts", []):
            shortcut.setParent(None)
        if getattr(self, "annotator", None) is not None:
            self.annotator.close_case()

    # ---- parameter node (scene) <-> controller state <-> widgets ----
    def onSceneClosed(self, *_):
        if self.process is not None:  # the run's input is gone: cancel it
            self.onApplyOrCancel()
        self.results = None
        self.onSceneChanged()

    def onSceneChanged(self, *_):
        from SpineKneeSegLib.panel.parameters import load_from_node, parameter_node

        node = parameter_node(slicer.mrmlScene)
        if node.GetParameter("task"):  # a saved scene: its panel state wins over the user settings
            load_from_node(self.controller, node)
        self.updateGUIFromState()
        self.onGUIChanged()  # selectors that kept or picked a node now fill in the state (and the node)

    def onGUIChanged(self, *_):
        if self._updating:
            return
        from SpineKneeSegLib.panel.parameters import parameter_node, save_settings, save_to_node

        s = self.controller.state
        fast_before, task_before, device_before = s.fast, s.task, s.device
        s.task = self.ui.taskSelector.currentData or s.task
        s.device = self.ui.deviceSelector.currentText or "auto"
        s.fast = self.ui.fastModeCheckBox.checked
        s.bfloat16 = self.ui.bfloat16CheckBox.checked
        if (s.task, s.device) != (task_before, device_before) and s.fast == fast_before:
            s.fast = self.controller.fast_mode_offered[0]  # re-offer for the new task / device
        s.weights_dir = self.ui.weightsDirPathLineEdit.currentPath
        nodes = [self.ui.inputVolumeSelector.currentNode(), self.ui.secondInputVolumeSelector.currentNode()]
        s.input_volume_ids = [n.GetID() for n in nodes[:1 + (len(_card(s.task).inputs) > 1)] if n]
        output = self.ui.outputSegmentationSelector.currentNode()
        s.output_segmentation_id = output.GetID() if output else ""
        save_to_node(self.controller, parameter_node(slicer.mrmlScene))
        save_settings(self.controller, qt.QSettings())
        self.updateGUIFromState()

    def updateGUIFromState(self):
        from SpineKneeSegLib.panel.controller import task_summary

        c, s = self.controller, self.controller.state
        self._updating = True
        try:
            self.ui.taskSelector.setCurrentIndex(self.ui.taskSelector.findData(s.task))
            self.ui.deviceSelector.setCurrentText(s.device)
            self.ui.fastModeCheckBox.checked = s.fast
            self.ui.bfloat16CheckBox.checked = s.bfloat16
            self.ui.weightsDirPathLineEdit.currentPath = s.weights_dir
            # only ids the state knows: an empty state leaves what a selector picked by itself
            for selector, node_id in zip((self.ui.inputVolumeSelector, self.ui.secondInputVolumeSelector),
                                         s.input_volume_ids):
                selector.setCurrentNodeID(node_id)
            if s.output_segmentation_id:
                self.ui.outputSegmentationSelector.setCurrentNodeID(s.output_segmentation_id)
        finally:
            self._updating = False
        self.ui.taskDescriptionLabel.text = task_summary(s.task)
        two_inputs = len(_card(s.task).inputs) > 1
        self.ui.secondInputVolumeLabel.visible = self.ui.secondInputVolumeSelector.visible = two_inputs
        if two_inputs:
            self.ui.secondInputVolumeLabel.text = f"{_card(s.task).inputs[1].name.upper()} (optional):"
        self.ui.deviceInfoLabel.text = c.device_text
        offered, why = c.fast_mode_offered
        self.ui.fastModeCheckBox.toolTip = why or "Not needed here: a large GPU, or nothing optional to skip."
        self.ui.fastModeCheckBox.enabled = not s.running and (offered or s.fast)
        self.ui.bfloat16CheckBox.enabled = not s.running
        nodes = [slicer.mrmlScene.GetNodeByID(i) for i in s.input_volume_ids]
        is_2d = [bool(n and n.GetImageData() and n.GetImageData().GetDimensions()[2] == 1) for n in nodes]
        ok, reason = c.validate(is_2d)
        self.ui.applyButton.text = c.apply_label
        self.ui.applyButton.enabled = ok or s.running
        self.ui.statusLabel.text = s.message if s.stage in ("failed", "cancelled", "done") and ok and s.message \
            else reason
        self.ui.inputsCollapsibleButton.enabled = not s.running
        self.ui.progressBar.value = int(100 * s.fraction)
        self.ui.progressBar.format = c.progress_text or "%p%"

    # ---- a run: QProcess of the CLI; Apply <-> Cancel ----
    def onApplyOrCancel(self):
        from SpineKneeSegLib.panel.runner import cli_environment, cli_python, kill_process_tree

        if self.process is not None:  # Cancel: the launcher AND the interpreter it started
            self.process.finished.disconnect(self.onProcessFinished)
            kill_process_tree(int(self.process.processId()))
            self.process.waitForFinished(5000)
            self.process = None
            self.controller.cancel()
            self.cleanupWorkdir()
            self.updateGUIFromState()
            return
        if self.controller.state.running:  # importing: the process is done, nothing to cancel
            return
        if not self.ensureDependencies():
            return self.updateGUIFromState()
        self.workdir = tempfile.mkdtemp(prefix="SpineKneeSeg-")
        nodes = [slicer.mrmlScene.GetNodeByID(i) for i in self.controller.state.input_volume_ids]
        inputs = self.logic.input_files(nodes, self.workdir)
        self.outputDir = os.path.join(self.workdir, "out")
        command = self.controller.command(cli_python(sys.executable), inputs, self.outputDir)
        self.controller.start()
        self.ui.logText.plainText = " ".join(command)
        self.process = qt.QProcess()
        env = qt.QProcessEnvironment()
        for key, value in cli_environment().items():
            env.insert(key, value)
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        self.process.readyReadStandardOutput.connect(self.onProcessOutput)
        self.process.finished.connect(self.onProcessFinished)
        self.process.errorOccurred.connect(self.onProcessError)
        self.process.start(command[0], command[1:])
        self.updateGUIFromState()

    def onProcessOutput(self):
        self.controller.feed(bytes(self.process.readAllStandardOutput()).decode(errors="replace"))
        self.ui.logText.plainText = "\n".join(self.controller.state.log[-200:])
        self.updateGUIFromState()

    def onProcessFinished(self, exitCode, _status=None):
        self.onProcessOutput()
        self.controller.feed("", final=True)
        self.process = None
        if self.controller.finished(exitCode):
            self.updateGUIFromState()
            slicer.app.processEvents()
            s = self.controller.state
            try:
                self.results = self.logic.import_results(
                    self.outputDir, slicer.mrmlScene.GetNodeByID(s.input_volume_ids[0]), s.task,
                    slicer.mrmlScene.GetNodeByID(s.output_segmentation_id) if s.output_segmentation_id else None)
                self.showResults()
                self.controller.imported(report=self.results.report)
            except Exception as exc:  # noqa: BLE001 - shown next to Apply, not as a traceback
                self.controller.imported(str(exc))
        self.cleanupWorkdir()
        self.updateGUIFromState()

    def onProcessError(self, error):
        if error == qt.QProcess.FailedToStart and self.process is not None:
            self.controller.state.message = f"Could not start {self.process.program()}: {self.process.errorString()}"
            self.process = None
            self.controller.finished(-1)
            self.cleanupWorkdir()
            self.updateGUIFromState()

    def cleanupWorkdir(self):
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def showResults(self):
        table = self.results.main_table
        self.ui.outputSegmentationSelector.setCurrentNode(self.results.segmentation)
        if table is None:
            return
        self.ui.resultsTableView.setMRMLTableNode(table)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        layout_table = slicer.app.layoutManager().tableWidget(0)
        if layout_table is not None:  # row click in the layout's table jumps too
            layout_table.tableView().clicked.connect(self.onResultRowClicked)

    def onResultRowClicked(self, index):
        from SpineKneeSegLib.mrml.results import jump_target

        if self.results is None or self.results.main_table is None:
            return
        ras = jump_target(self.results.main_table, index.row())
        if ras is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*ras, True)

    # ---- first use: Python packages (asked, never SimpleITK/numpy/vtk/slicer-core) ----
    def ensureDependencies(self):
        from SpineKneeSegLib.panel.dependencies import is_offline_error, offline_message, plan_install

        plan = plan_install(pytorch_extension=importlib.util.find_spec("PyTorchUtils") is not None)
        if not plan.needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.question(), windowTitle="SpineKneeSeg"):
            self.controller.state.message = "PyTorch and the other Python packages are needed to run."
            return False
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            if plan.torch == "pytorch-extension":
                import PyTorchUtils

                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
            if plan.pip:
                _pip_ensure(plan)
        except Exception as exc:  # noqa: BLE001 - the reason goes next to Apply
            text = f"{exc} {getattr(exc, 'output', '') or ''}"
            offline = is_offline_error(text)
            self.controller.state.message = offline_message(plan) if offline else f"Install failed: {exc}"
            return False
        finally:
            qt.QApplication.restoreOverrideCursor()
        from SpineKneeSegLib.engine.devices import detect_devices

        self.controller.set_devices(*detect_devices(), initial=True)
        return True

def _card(task):
    from SpineKneeSegLib.tasks import TASKS

    return TASKS[task]


def _pip_ensure(plan):
    """slicer.pydeps.pip_ensure (Slicer >= 5.11) with the plan's skip list; older Slicer: pip_install."""
    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            pydeps = importlib.import_module(name)
            ensure = pydeps.pip_ensure
        except (ImportError, AttributeError):
            continue
        from packaging.requirements import Requirement

        return ensure([Requirement(r) for r in plan.pip], skip_packages=plan.skip_packages, prompt_install=False,
                      requester="SpineKneeSeg")
    slicer.util.pip_install(" ".join(f'"{r}"' for r in plan.pip))


class SpineKneeSegTest(ScriptedLoadableModuleTest):
    """Inside Slicer (README: "Running SpineKneeSegTest"): every task on a phantom, run in a PythonSlicer
    child process exactly as the panel runs it, results loaded into Slicer's own scene and checked
    (SpineKneeSegLib/panel/selftest.py; the same body runs headless in Testing/test_runner.py)."""

    def runTest(self):
        from SpineKneeSegLib.panel import selftest

        slicer.mrmlScene.Clear(0)
        selftest.run_all(slicer.mrmlScene, log=self.delayDisplay)
        self.delayDisplay("SpineKneeSegTest passed: every task ran in PythonSlicer and its results were imported")
