"""Static checks of what cannot run headless: the Slicer module file, its .ui and CMake lists."""
import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SpineKneeSeg"
UI = MODULE / "Resources" / "UI" / "SpineKneeSeg.ui"


def _ui_names():
    tree = ET.parse(UI)
    return {w.get("name") for w in tree.iter("widget")}


def test_ui_parses_and_names_used_by_the_widget_exist():
    names = _ui_names()
    source = (MODULE / "SpineKneeSeg.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no ui names?"
    assert used <= names, f"missing in .ui: {sorted(used - names)}"


def _ui_classes():
    return {w.get("name"): w.get("class") for w in ET.parse(UI).iter("widget")}


# Signals the widget connects, per widget class (Qt/CTK/qMRML documentation): a typo in a signal
# name only fails inside Slicer, so the names are checked here against this list.
SIGNALS = {
    "QComboBox": {"currentIndexChanged", "currentTextChanged"},
    "QCheckBox": {"toggled", "stateChanged"},
    "QPushButton": {"clicked", "toggled"},
    "QListWidget": {"itemClicked", "itemDoubleClicked", "currentRowChanged"},
    "qMRMLNodeComboBox": {"currentNodeChanged", "currentNodeIDChanged"},
    "ctkPathLineEdit": {"currentPathChanged"},
    "qMRMLTableView": {"clicked", "doubleClicked"},
}


def test_signals_the_widget_connects_exist_on_their_widget_class():
    classes = _ui_classes()
    source = (MODULE / "SpineKneeSeg.py").read_text()
    connected = re.findall(r"self\.ui\.(\w+)\.(\w+)\.connect\(", source)
    grouped = source.split("for signal in (", 1)[1].split("):", 1)[0]  # signals connected in one loop
    connected += re.findall(r"self\.ui\.(\w+)\.(\w+)", grouped)
    assert len(connected) >= 14
    for name, signal in connected:
        assert signal in SIGNALS[classes[name]], f"{name} ({classes[name]}) has no signal {signal}"
    # the Annotate buttons are connected by name from annotate_panel.BUTTONS
    from SpineKneeSegLib.annotation.controller import BUTTONS

    assert all(classes[name] == "QPushButton" for name in BUTTONS)


def test_ui_connections_reference_existing_widgets_and_every_mrml_widget_gets_the_scene():
    tree = ET.parse(UI)
    names = _ui_names()
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in tree.iter("connection")]
    assert connections
    for sender, signal, receiver, slot in connections:
        assert sender in names and receiver in names, (sender, receiver)
    scene_receivers = {r for s, sig, r, slot in connections if slot == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, c in _ui_classes().items() if c.startswith("qMRML") and c != "qMRMLWidget"}
    assert mrml_widgets and mrml_widgets <= scene_receivers, mrml_widgets - scene_receivers
    custom = {c.findtext("class") for c in tree.iter("customwidget")}
    assert {c for c in _ui_classes().values() if not c.startswith("Q")} <= custom


def test_ui_node_types_are_real_mrml_classes():
    slicer = pytest.importorskip("slicer", reason="slicer-core not installed (pip install -e '.[headless]')")
    scene = slicer.vtkMRMLScene()
    types = [s.text for prop in ET.parse(UI).iter("property") if prop.get("name") == "nodeTypes"
             for s in prop.iter("string")]
    assert types
    for t in types:
        assert scene.CreateNodeByClass(t) is not None, t


def test_module_file_is_thin_and_parses():
    source = (MODULE / "SpineKneeSeg.py").read_text()
    tree = ast.parse(source)
    # thin: Qt wiring only (panel + Annotate section); logic lives in the tested Lib
    assert len(source.splitlines()) < 400
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"SpineKneeSeg", "SpineKneeSegWidget", "SpineKneeSegLogic", "SpineKneeSegTest"} <= classes


def test_lib_never_imports_qt_and_only_mrml_modules_import_slicer():
    allowed_slicer = {"mrml/nodes.py", "mrml/harness.py"}
    lib = MODULE / "SpineKneeSegLib"
    for path in lib.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert not {"qt", "ctk", "PythonQt"} & set(names), f"{path.name} imports Qt"
            if path.relative_to(lib).as_posix() not in allowed_slicer and isinstance(node, (ast.Import, ast.ImportFrom)):
                # other modules may import slicer only lazily (inside functions), never at top level
                assert "slicer" not in names or node not in tree.body, f"{path.name} imports slicer at top level"


def test_cmake_lists_every_python_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake
    py_files = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts)
    resources = sorted(str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
                       if p.is_file() and p.suffix in (".ui", ".png", ".json", ".md", ".pt", ".gz"))
    for f in py_files + resources:
        assert f in cmake, f"{f} missing from SpineKneeSeg/CMakeLists.txt"
    listed = set(re.findall(r"^\s+(\S+\.py)$", cmake, re.M))
    assert listed == set(py_files), f"listed but absent: {sorted(listed - set(py_files))}"


def test_extension_metadata():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY \"Segmentation\"", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_DEPENDS \"NA\"",
                "add_subdirectory(SpineKneeSeg)", "project(SpineKneeSeg)"):
        assert key in cmake, key


def test_readme_test_command_is_what_ci_runs():
    import subprocess

    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci
    extracted = subprocess.run(["bash", "-c", ci.split("cmd=", 1)[1].split("\n", 1)[0].join(("x=", "; echo \"$x\""))],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert extracted.startswith("pip install torch==2.13.0") and "pytest" in extracted
    assert extracted in readme
    assert "spinekneeseg demo" in readme


def test_every_weights_file_is_registered_with_its_sha256_and_listed():
    """No unregistered .pt in the tree: each tracked weights file (test fixtures aside, see
    Testing/fixtures/README.md) has a registry entry with its SHA256 and a CMake resource line; a
    kept cross-validation fold model (Training/results) is registered with a card in its own folder
    and not bundled."""
    import hashlib
    import json
    import subprocess

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.pt"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    registry = json.loads((MODULE / "Resources" / "Models" / "registry.json").read_text())["models"]
    entries = {f"SpineKneeSeg/Resources/Models/{m['file']}": m for m in registry}
    cmake = (MODULE / "CMakeLists.txt").read_text()
    for path in listed.stdout.split():
        if path.startswith("Testing/fixtures/"):
            continue
        if path.startswith("Training/results/"):  # kept cv fold models: registered where they lie, never bundled
            folder = json.loads((ROOT / path).parent.joinpath("registry.json").read_text())["models"]
            own = {m["file"]: m for m in folder}
            assert Path(path).name in own, f"{path} is not in its folder's registry.json"
            assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == own[Path(path).name]["sha256"], path
            assert (ROOT / path).parent.joinpath(own[Path(path).name]["card"]).is_file(), f"no card for {path}"
            bundled = {m["sha256"] for m in registry}
            assert own[Path(path).name]["sha256"] not in bundled, f"{path}: a fold model must not be shipped"
            continue
        assert path in entries, f"{path} is not in registry.json"
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == entries[path]["sha256"], path
        assert path.removeprefix("SpineKneeSeg/") in cmake, f"{path} missing from SpineKneeSeg/CMakeLists.txt"
    for path, entry in entries.items():
        assert (ROOT / path).exists(), f"registry lists {path}, which is not there"
        assert (MODULE / "Resources" / "Models" / entry["card"]).exists(), f"no model card for {path}"


# modules whose open() is not a text file's: images, archives, arrays, raw descriptors
_NOT_TEXT_OPENERS = {"PILImage", "Image", "tarfile", "zipfile", "h5py", "np", "sitk", "os", "tempfile", "webbrowser"}
# modules whose open(file, mode) is binary unless the mode has "t"
_FILE_OPENERS = {"gzip", "lzma", "bz2"}


def _implicit_encoding(call: ast.Call) -> bool:
    """A text-mode open()/Path.open()/os.fdopen()/read_text()/write_text() without encoding=."""
    func = call.func
    if any(k.arg == "encoding" for k in call.keywords):
        return False
    if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
        return True
    module = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
    if (isinstance(func, ast.Name) and func.id == "open") or (module == "io" and func.attr == "open"):
        mode_at = 1
    elif isinstance(func, ast.Attribute) and func.attr == "fdopen":
        mode_at = 1
    elif module in _FILE_OPENERS and func.attr == "open":
        modes = [a.value for a in call.args[1:2] if isinstance(a, ast.Constant)]
        modes += [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
        return any("t" in str(m) for m in modes)  # binary unless "t": gzip.open(p), lzma.open(p, "wb")
    elif isinstance(func, ast.Attribute) and func.attr == "open" and module not in _NOT_TEXT_OPENERS:
        mode_at = 0  # Path.open(mode)
    else:
        return False
    modes = [a.value for a in call.args[mode_at:mode_at + 1] if isinstance(a, ast.Constant)]
    modes += [k.value.value for k in call.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
    return not any("b" in str(m) for m in modes)


def test_text_files_are_read_and_written_as_utf8_whatever_the_locale():
    """Every text file the extension, its training scripts and benchmarks read or write names its
    encoding. Left to the locale, a Windows Slicer (cp1252) writes what a Linux one cannot read, and a
    process whose locale was set to C (ITK's GDCM writer does so and leaves it) fails on any
    non-ASCII byte: a name in a model card, a path in a worklist."""
    found = []
    for folder in (MODULE, ROOT / "Training", ROOT / "Testing" / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if "egg-info" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and _implicit_encoding(node)]
    assert not found, "text I/O without encoding=:\n" + "\n".join(found)


def test_the_encoding_check_finds_what_it_must():
    calls = {"open(p)": True, "open(p, 'w', newline='')": True, "Path(p).read_text()": True,
             "p.write_text(s)": True, "os.fdopen(fd, 'w')": True, "p.open()": True, "p.open('a')": True,
             "open(p, 'rb')": False, "p.open(mode='wb')": False, "p.read_text(encoding='utf-8')": False,
             "PILImage.open(p)": False, "gzip.open(p)": False, "os.open(p, flags)": False,
             "lzma.open(p, 'wb', preset=6)": False, "gzip.open(p, 'rt')": True, "bz2.open(p, mode='wt')": True,
             "io.open(p)": True, "io.open(p, 'rb')": False,
             "open(p, encoding='utf-8-sig')": False}
    for source, implicit in calls.items():
        assert _implicit_encoding(ast.parse(source, mode="eval").body) is implicit, source
