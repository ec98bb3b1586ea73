"""`spinekneeseg demo`: every task on a built-in phantom and on the real sample scans shipped in
Resources/SampleData (or, for a task without one, a real shared case when ../shared/data is
present), with an HTML report of overlays and each model's status. Tasks without weights show
their phantom and ground truth and say which issue trains them, so the report never pretends."""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from SpineKneeSegLib.core.atomic import atomic_directory, check_writable_dir
from SpineKneeSegLib.core.datasets import data_root, sample_dir, samples_for
from SpineKneeSegLib.core.errors import NoWeightsError
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.engine.cards import TaskCard
from SpineKneeSegLib.engine.pipeline import RunOptions, run_case
from SpineKneeSegLib.engine.postprocessing import dice
from SpineKneeSegLib.engine.render import save_overlay, side_by_side
from SpineKneeSegLib.engine.weights import find_entry
from SpineKneeSegLib.tasks import TASKS

# one real case per task when ../shared/data is present: (relative image path, relative label path)
SHARED_CASES = {
    # a 381 mm T2 case, the widest field of view (lumbar-levels v0.4.0 was trained on every labelled
    # scan, this one included: its held-out figures are in the model card, not here)
    "lumbar-foramina": ("spine/zukic-t2/case06/image.nii.gz", "spine/zukic-t2/case06/vertebrae.nii.gz"),
    "brain-wmh": ("brain/open-ms/patient07/flair.nii.gz", "brain/open-ms/patient07/lesions.nii.gz"),
    "knee-bones": ("knee/dess-dicom", None),
    # a JSRT radiograph held out of xray-chest's training (its fixed split), stored inverted
    "xray-chest": ("xray/jsrt-scr/JPCLN001/image.nii.gz", "xray/jsrt-scr/JPCLN001/labels.nii.gz"),
}


def per_label_dice(pred: np.ndarray, truth: np.ndarray, card: TaskCard) -> dict[str, float | None]:
    return {s.name: dice(pred == s.value, truth == s.value) for s in card.labels}


def run_demo(output: str | Path, device: str = "auto", use_data: bool = True) -> dict:
    from SpineKneeSegLib.core.image_io import read_image
    from SpineKneeSegLib.tasks import make_phantom

    output = check_writable_dir(output)
    root = data_root() if use_data else None
    sections = []
    with atomic_directory(output) as stage:
        for card in TASKS.values():
            folder = stage / card.name
            folder.mkdir()
            phantom = make_phantom(card.name, seed=0)
            input_path = folder / "phantom.nii.gz"
            write_image(phantom.image, input_path)
            truth_png = save_overlay(folder / "truth.png", phantom.image, phantom.labels, card.labels,
                                     card.preprocessing.plane, "ground truth")
            section = {"task": card.name, "title": card.title, "phantom": phantom.description, "cases": []}
            if find_entry(card.weights_entry) is None:
                section["status"] = f"no weights yet (trained in issue {card.issue})"
                section["cases"].append({"name": "phantom", "png": str(truth_png.relative_to(stage))})
                shared = _shared_reference(card, root, folder, stage) if root is not None else None
                if shared:
                    section["cases"].append(shared)
                sections.append(section)
                continue
            entry = find_entry(card.weights_entry)
            section["status"] = f"{entry.file} (v{entry.version}): {entry.description or 'no description'}"
            section["cases"].append(_run_and_score(card, "phantom (synthetic)", [str(input_path)],
                                                   phantom.labels.array, folder, stage, device, truth_png))
            for n, sample in enumerate(samples_for(card.name)):
                section["cases"].append(_run_sample(card, sample, folder / f"sample{n}", stage, device))
            if root is not None and card.name in SHARED_CASES and not samples_for(card.name):
                rel_image, rel_labels = SHARED_CASES[card.name]
                if (root / rel_image).exists():
                    truth = read_image(root / rel_labels) if rel_labels else None
                    truth_png = None
                    if truth is not None:
                        (folder / "shared").mkdir()
                        truth = truth.with_array(np.where(truth.array <= len(card.labels), truth.array, 0)
                                                 .astype(np.uint8))
                        truth_png = save_overlay(folder / "shared" / "truth.png", read_image(root / rel_image),
                                                 truth, card.labels, card.preprocessing.plane,
                                                 "dataset reference labels")
                    section["cases"].append(_run_and_score(
                        card, f"shared: {rel_image}", [str(root / rel_image)],
                        truth.array if truth is not None else None, folder / "shared", stage, device, truth_png))
            sections.append(section)
        summary = {"tasks": sections, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (stage / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (stage / "report.html").write_text(_html(sections), encoding="utf-8")
    print(f"demo report: {Path(output) / 'report.html'}")
    return summary


def _shared_reference(card: TaskCard, root: Path, folder: Path, stage: Path) -> dict | None:
    """A real shared case with the dataset's own labels (not a prediction), when it has any."""
    from SpineKneeSegLib.core.image_io import read_image

    rel_image, rel_labels = SHARED_CASES.get(card.name, (None, None))
    if rel_labels is None or not (root / rel_image).exists():
        return None
    image, labels = read_image(root / rel_image), read_image(root / rel_labels)
    labels = labels.with_array(np.where(np.isin(labels.array, [s.value for s in card.labels]), labels.array, 0)
                               .astype(np.uint8))
    png = save_overlay(folder / "shared_reference.png", image, labels, card.labels, card.preprocessing.plane,
                       "dataset reference labels (not a prediction)")
    return {"name": f"shared case {rel_image} with its reference labels", "png": str(png.relative_to(stage))}


def _run_sample(card: TaskCard, sample, folder: Path, stage: Path, device) -> dict:
    """A shipped real sample scan, with its reference labels beside the prediction when it has any."""
    from SpineKneeSegLib.core.image_io import read_image

    folder.mkdir(parents=True)
    image_path = sample_dir() / sample.image
    truth, truth_png = None, None
    if sample.labels:
        labels = read_image(sample_dir() / sample.labels)
        labels = labels.with_array(np.where(labels.array <= len(card.labels), labels.array, 0).astype(np.uint8))
        truth, truth_png = labels.array, save_overlay(folder / "truth.png", read_image(image_path), labels,
                                                      card.labels, card.preprocessing.plane, "dataset reference labels")
    case = _run_and_score(card, f"real sample: {sample.name}", [str(image_path)], truth, folder, stage, device,
                          truth_png)
    case["note"] = f"{sample.source}. In the model's training data: {sample.seen_in_training}."
    return case


def _run_and_score(card, name, inputs, truth, folder: Path, stage: Path, device, truth_png):
    from SpineKneeSegLib.core.image_io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    run_dir = folder / "run"
    try:
        report = run_case(card, inputs, run_dir, RunOptions(device=device, scene=True))
    except NoWeightsError as exc:
        return {"name": name, "error": str(exc)}
    pred = read_image(run_dir / "labels.nii.gz")
    image = read_image(inputs[0] if len(inputs) == 1 else inputs)
    pred_png = save_overlay(folder / "prediction.png", image, pred, card.labels, card.preprocessing.plane,
                            "prediction")
    pngs = [truth_png, pred_png] if truth_png else [pred_png]
    combined = side_by_side(pngs, folder / "overlay.png") if len(pngs) > 1 else pred_png
    case = {"name": name, "png": str(combined.relative_to(stage)), "timings_s": report["timings_s"],
            "summaries": report["summaries"], "warnings": report["warnings"]}
    if truth is not None and truth.shape == pred.array.shape:
        case["dice"] = per_label_dice(pred.array, truth, card)
    elif truth is not None:
        case["warnings"].append(f"reference labels {truth.shape} do not match the image {pred.array.shape}: "
                                "no Dice")
    return case


def _html(sections) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SpineKneeSeg demo</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px} img{max-width:100%;"
             "border:1px solid #ccc} .warn{color:#a60} td,th{padding:2px 8px;text-align:left}</style>",
             "</head><body><h1>SpineKneeSeg demo</h1>",
             "<p>Every task on a built-in synthetic phantom and on the small real sample scans shipped "
             "with the module (each with its source, licence and whether the model saw it in training). "
             "Phantoms are generated, not patients, and the models were not trained for them: figures "
             "on phantoms test the pipeline, not accuracy. The model cards give held-out figures.</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s['title'])} <small>({html.escape(s['task'])})</small></h2>")
        parts.append(f"<p>Status: <b>{html.escape(s['status'])}</b>. Phantom: {html.escape(s['phantom'])}</p>")
        for case in s["cases"]:
            parts.append(f"<h3>{html.escape(case['name'])}</h3>")
            if "error" in case:
                parts.append(f"<p class='warn'>{html.escape(case['error'])}</p>")
                continue
            if "note" in case:
                parts.append(f"<p>{html.escape(case['note'])}</p>")
            parts.append(f"<img src='{html.escape(case['png'])}' alt='{html.escape(case['name'])}'>")
            if "dice" in case:
                rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{'-' if v is None else f'{v:.3f}'}</td></tr>"
                               for k, v in case["dice"].items())
                parts.append(f"<table><tr><th>segment</th><th>Dice</th></tr>{rows}</table>")
            if "timings_s" in case:
                parts.append("<p>Timings (s): " + html.escape(
                    ", ".join(f"{k} {v:.2f}" for k, v in case["timings_s"].items())) + "</p>")
            for w in case.get("warnings", []):
                parts.append(f"<p class='warn'>{html.escape(w)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
