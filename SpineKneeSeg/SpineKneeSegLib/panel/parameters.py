"""The panel's state in the scene (a raw vtkMRMLScriptedModuleNode: saved with the scene) and in
the user's settings (between sessions).

Slicer's ``parameterNodeWrapper`` imports qt at import time, so it cannot run headless; this plain
version works on slicer-core's MRML and on Slicer's alike. Settings go through any object with
QSettings' ``value(key)`` / ``setValue(key, value)`` (``qt.QSettings()`` in Slicer).
"""
from __future__ import annotations

from SpineKneeSegLib.panel.controller import (
    SCENE_PARAMETERS,
    USER_SETTINGS,
    PanelController,
)

MODULE_NAME = "SpineKneeSeg"
SETTINGS_GROUP = "SpineKneeSeg"
INPUT_ROLE = "InputVolume"  # + index: node references keep the ids right when a scene is imported
OUTPUT_ROLE = "OutputSegmentation"


def parameter_node(scene):
    """The module's singleton parameter node in ``scene`` (created on first use), as
    ScriptedLoadableModuleLogic.getParameterNode makes it."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference; the scene keeps its own
        node.SetSingletonTag(MODULE_NAME)
        node.SetModuleName(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node = scene.AddNode(node)
    return node


def save_to_node(controller: PanelController, node) -> None:
    was = node.StartModify()
    for key, value in controller.parameters(SCENE_PARAMETERS).items():
        node.SetParameter(key, value)
    state = controller.state
    for i in range(max(len(state.input_volume_ids), _count_inputs(node))):
        node.SetNodeReferenceID(f"{INPUT_ROLE}{i}", state.input_volume_ids[i] if i < len(state.input_volume_ids)
                                else None)
    node.SetNodeReferenceID(OUTPUT_ROLE, state.output_segmentation_id or None)
    node.EndModify(was)


def load_from_node(controller: PanelController, node) -> None:
    controller.restore({key: node.GetParameter(key) for key in SCENE_PARAMETERS}, SCENE_PARAMETERS)
    ids = []
    for i in range(_count_inputs(node)):
        ref = node.GetNodeReference(f"{INPUT_ROLE}{i}")
        if ref is None:
            break
        ids.append(ref.GetID())
    controller.state.input_volume_ids = ids
    output = node.GetNodeReference(OUTPUT_ROLE)
    controller.state.output_segmentation_id = output.GetID() if output is not None else ""


def _count_inputs(node) -> int:
    n = 0
    while node.GetNodeReferenceID(f"{INPUT_ROLE}{n}"):
        n += 1
    return n


def save_settings(controller: PanelController, settings) -> None:
    for key, value in controller.parameters(USER_SETTINGS).items():
        settings.setValue(f"{SETTINGS_GROUP}/{key}", value)


def load_settings(controller: PanelController, settings) -> None:
    values = {}
    for key in USER_SETTINGS:
        value = settings.value(f"{SETTINGS_GROUP}/{key}")
        if value is not None:
            values[key] = str(value)
    controller.restore(values, USER_SETTINGS)
