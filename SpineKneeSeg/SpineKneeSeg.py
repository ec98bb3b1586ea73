"""SpineKneeSeg scripted module: thin Qt layer over SpineKneeSegLib (all logic lives there).

Runs happen in a separate process (QProcess) executing the same CLI as the command line
(`PythonSlicer -m SpineKneeSegLib.cli run ... --progress json`), so Slicer never freezes and the
code path is the one the tests cover. Only this file needs Qt; it is not testable headless.
"""
import os
import sys
import tempfile

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

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


class SpineKneeSegLogic:
    """Plain class (ScriptedLoadableModuleLogic imports qt): Slicer's getModuleLogic reads widget.logic."""

    def __init__(self):
        from SpineKneeSegLib.panel import PanelController

        self.controller = PanelController()

    def export_inputs(self, volume_nodes, folder):
        from SpineKneeSegLib import mrml

        paths = []
        for i, node in enumerate(volume_nodes):
            path = os.path.join(folder, f"input{i}.nrrd")
            mrml.save_node(node, path)
            paths.append(path)
        return paths

    def import_results(self, output_dir, reference_volume):
        from SpineKneeSegLib import mrml

        scene = slicer.mrmlScene
        nodes = [mrml.load_segmentation(scene, os.path.join(output_dir, "segmentation.seg.nrrd"))]
        nodes[0].SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        nodes[0].CreateClosedSurfaceRepresentation()
        for name in os.listdir(output_dir):
            full = os.path.join(output_dir, name)
            if name.endswith(".mrk.json"):
                nodes.append(mrml.load_markups(scene, full))
            elif name.endswith(".tsv") and not name.endswith(".schema.tsv"):
                nodes.append(mrml.load_table(scene, full))
        return nodes


class SpineKneeSegWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from SpineKneeSegLib.tasks import TASKS

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SpineKneeSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineKneeSegLogic()
        self.process = None
        for name, card in TASKS.items():
            self.ui.taskSelector.addItem(card.title, name)
        self.ui.deviceSelector.addItems(["auto", "cpu", "cuda", "mps"])
        self.ui.taskSelector.currentIndexChanged.connect(self.updateGUI)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.updateGUI)
        self.ui.applyButton.clicked.connect(self.onApplyOrCancel)
        self.setupAnnotate()
        self.updateGUI()

    # ---- Annotate section: buttons and shortcuts -> AnnotatePanel (Lib, tested headless) ----
    def setupAnnotate(self):
        from SpineKneeSegLib.annotate_panel import BUTTONS, SHORTCUTS, AnnotatePanel
        from SpineKneeSegLib.mrml_harness import get_app

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
        for shortcut in getattr(self, "shortcuts", []):
            shortcut.setParent(None)
        if getattr(self, "annotator", None) is not None:
            self.annotator.close_case()

    def updateGUI(self, *_):
        from SpineKneeSegLib.tasks import TASKS

        state = self.logic.controller.state
        state.task = self.ui.taskSelector.currentData or state.task
        state.device = self.ui.deviceSelector.currentText or "auto"
        node = self.ui.inputVolumeSelector.currentNode()
        state.input_volume_ids = [node.GetID()] if node else []
        is_2d = [node.GetImageData().GetDimensions()[2] == 1] if node and node.GetImageData() else []
        self.ui.taskDescriptionLabel.text = TASKS[state.task].description
        ok, reason = self.logic.controller.validate(is_2d)
        self.ui.applyButton.text = self.logic.controller.apply_label
        self.ui.applyButton.enabled = ok or state.running
        self.ui.statusLabel.text = reason

    def onApplyOrCancel(self):
        if self.process is not None:
            self.process.kill()  # QProcess.kill ends the CLI; it writes outputs atomically, so nothing partial
            self.logic.controller.cancel()
            self.process = None
            self.updateGUI()
            return
        self.workdir = tempfile.mkdtemp(prefix="SpineKneeSeg-")
        inputs = self.logic.export_inputs([self.ui.inputVolumeSelector.currentNode()], self.workdir)
        self.outputDir = os.path.join(self.workdir, "out")
        command = self.logic.controller.command(sys.executable if "PythonSlicer" in sys.executable
                                                else os.path.join(os.path.dirname(sys.executable), "PythonSlicer"),
                                                inputs, self.outputDir)
        self.logic.controller.start()
        self.process = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()  # PythonSlicer must find SpineKneeSegLib beside this file
        env.insert("PYTHONPATH", os.pathsep.join(filter(None, [os.path.dirname(__file__), env.value("PYTHONPATH")])))
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        self.process.readyReadStandardOutput.connect(self.onProcessOutput)
        self.process.finished.connect(self.onProcessFinished)
        self.process.start(command[0], command[1:])
        self.updateGUI()

    def onProcessOutput(self):
        text = bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        for line in text.splitlines():
            self.logic.controller.handle_output_line(line)
        state = self.logic.controller.state
        self.ui.progressBar.value = int(100 * state.fraction)
        self.ui.progressBar.format = state.stage
        self.ui.logText.plainText = "\n".join(state.log[-200:])

    def onProcessFinished(self, exitCode, _status=None):
        self.process = None
        if exitCode == 0:
            self.logic.import_results(self.outputDir, self.ui.inputVolumeSelector.currentNode())
        self.logic.controller.finished(exitCode)
        self.ui.progressBar.value = int(100 * self.logic.controller.state.fraction)
        self.updateGUI()


class SpineKneeSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (`Slicer --no-main-window --python-script`): real inference on a phantom."""

    def runTest(self):
        slicer.mrmlScene.Clear(0)
        self.test_phantom_run()

    def test_phantom_run(self):
        """Phantom -> volume node -> the CLI in a separate PythonSlicer process (as the panel runs it,
        with a tiny untrained network) -> results imported into Slicer's own scene."""
        import subprocess

        from SpineKneeSegLib import mrml
        from SpineKneeSegLib.phantoms import make_phantom
        from SpineKneeSegLib.tasks import TASKS
        from SpineKneeSegLib.weights import initialise_weights

        folder = tempfile.mkdtemp(prefix="SpineKneeSegTest-")
        phantom = make_phantom("brain-wmh", seed=1)
        volume = mrml.image_to_volume_node(slicer.mrmlScene, phantom.image, "phantom")
        weights = os.path.join(folder, "tiny.pt")
        initialise_weights("brain-wmh", weights, {"channels": (4, 8)})
        logic = SpineKneeSegLogic()
        logic.controller.state.task = "brain-wmh"
        logic.controller.state.weights = weights
        inputs = logic.export_inputs([volume], folder)
        out = os.path.join(folder, "out")
        python = os.path.join(os.path.dirname(sys.executable), "PythonSlicer")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                                           os.environ.get("PYTHONPATH")])))
        result = subprocess.run(logic.controller.command(python if os.path.exists(python) else sys.executable,
                                                         inputs, out), capture_output=True, text=True, env=env)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        nodes = logic.import_results(out, volume)
        segmentation = nodes[0].GetSegmentation()
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), TASKS["brain-wmh"].labels[0].name)
        self.assertTrue(any(n.IsA("vtkMRMLTableNode") for n in nodes))
        self.delayDisplay("SpineKneeSeg: CLI run in PythonSlicer and results imported")
