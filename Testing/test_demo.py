"""`spinekneeseg demo` (README's first command) shows the shipped models on the real sample scans
of Resources/SampleData, with the model's status and whether it saw the sample in training
(issue 23, part 5)."""
import json

import pytest
from SpineKneeSegLib.core.datasets import SAMPLES, sample_data_sources, sample_dir


def test_every_sample_file_is_shipped_and_attributed():
    readme = (sample_dir() / "README.md").read_text()
    for sample in SAMPLES:
        for name in filter(None, (sample.image, sample.labels)):
            assert (sample_dir() / name).is_file(), name
        assert sample.image.split("-")[0] in readme and "licence" in readme.lower()
    sources = sample_data_sources()
    assert len(sources) == len(SAMPLES)
    assert all(s["uris"].startswith("file://") and s["category"] == "SpineKneeSeg" for s in sources)


@pytest.mark.mrml
@pytest.mark.slow
def test_demo_runs_the_shipped_models_on_the_real_samples(tmp_path):
    from SpineKneeSegLib.demo import run_demo

    summary = run_demo(tmp_path / "demo", use_data=False)
    sections = {s["task"]: s for s in summary["tasks"]}
    for sample in SAMPLES:
        section = sections[sample.task]
        assert "starter" in section["status"]  # the registry's honest description
        case = next(c for c in section["cases"] if c["name"] == f"real sample: {sample.name}")
        assert "error" not in case and (tmp_path / "demo" / case["png"]).is_file()
        assert "In the model's training data" in case["note"]
    lumbar = next(c for c in sections["lumbar-foramina"]["cases"] if c["name"].startswith("real sample"))
    assert min(lumbar["dice"].values()) > 0.7  # a scan the model was trained on: all five levels found
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "real sample" in html and "CC BY" in html
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["tasks"]
