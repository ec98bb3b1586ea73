"""A cohort's tables: each finished case's volumes.tsv (lesions.tsv, areas.tsv, femoral_heads.tsv)
gathered into one table for the cohort, OUT/cohort_<name>, with the case's ID first: what a study
loads for its statistics, instead of a folder per case."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from SpineKneeSegLib import cli
from SpineKneeSegLib.core.image_io import write_image
from SpineKneeSegLib.engine import batch
from SpineKneeSegLib.engine.weights import initialise_weights
from SpineKneeSegLib.tasks import make_phantom


def _table(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as table:
        return list(csv.DictReader(table, delimiter="\t"))


@pytest.fixture
def knee_cohort(tmp_path):
    """Tiny knee weights, a phantom scan, and a manifest of a, a broken case, and b."""
    initialise_weights("knee-bones", tmp_path / "knee.pt", {"channels": (4, 8)}, seed=1)
    write_image(make_phantom("knee-bones", seed=1).image, tmp_path / "knee.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\na,knee.nii.gz\nbroken,absent.nii.gz\nb,knee.nii.gz\n")
    return ["run", "--task", "knee-bones", "--manifest", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"),
            "--weights", str(tmp_path / "knee.pt")]


def test_a_cohort_gathers_its_cases_volumes_into_one_table(knee_cohort, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(knee_cohort) == 2  # the broken case
    expected = [{"case": case, **row} for case in "ab" for row in _table(out / case / "volumes.tsv")]
    table = _table(out / "cohort_volumes.tsv")
    assert table == expected  # manifest order; the failed case has no rows
    assert [row["structure"] for row in table] == ["femur", "tibia", "fibula", "patella"] * 2
    findings = _table(out / "cohort_findings.tsv")  # one row a case: its report's summaries
    assert [row["case"] for row in findings] == ["a", "b"]
    for row in findings:
        summaries = json.loads((out / row["case"] / "report.json").read_text())["summaries"]
        assert row["knee_plausibility.passed"] == str(summaries["knee_plausibility"]["passed"])
        assert float(row["knee_plausibility.volumes_ml.tibia"]) == summaries["knee_plausibility"]["volumes_ml"]["tibia"]
    assert (f"{out / 'summary.tsv'}, cohort_findings.tsv (each case's report summaries), cohort_volumes.tsv "
            f"(every case's volumes)") in capsys.readouterr().err
    first = [(out / name).read_text() for name in ("cohort_volumes.tsv", "cohort_findings.tsv")]

    assert cli.main(knee_cohort) == 2  # a re-run: a and b skipped, their tables gathered again
    assert [(out / name).read_text() for name in ("cohort_volumes.tsv", "cohort_findings.tsv")] == first


def test_cohort_tables_take_every_column_and_name_a_file_they_cannot_read(tmp_path):
    """Cases of two versions (one with an extra column, one with another summary): the union, blank
    where a case has none. A table whose rows do not fit its header, or a report that cannot be
    read, is named, and its case left out of that cohort table."""
    tables = {"a": "structure\tvolume_ml\nfemur\t1.5\n",
              "b": "structure\tvolume_ml\tnew\nfemur\t2.5\tx\n",
              "c": "structure\tvolume_ml\nfemur\n",  # a cell short
              "d": "structure\tvolume_ml\nfemur\t9.9\n"}  # a failed case's: not gathered
    summaries = {"a": {"lesions": {"lesion_count": 3, "brackets": {"[0,10)": {"count": 2}}, "ids": [1, 2]},
                       "stripped": True, "note": "two\twords\n"},
                 "b": {"lesions": {"lesion_count": 0}, "threshold": None}}
    for case, text in tables.items():
        (tmp_path / case).mkdir()
        (tmp_path / case / "volumes.tsv").write_text(text)
        if case in summaries:
            (tmp_path / case / "report.json").write_text(json.dumps({"summaries": summaries[case]}))
    (tmp_path / "c" / "report.json").write_text("{")  # cut short
    (tmp_path / "a" / "volumes.schema.tsv").write_text("columnName\tdescription\nvolume_ml\tvolume\n")
    rows = [(c, "ok" if c != "b" else "skipped", 0, "", "", "", "", "") for c in "abc"]
    written, problems = batch.write_cohort_tables(tmp_path, rows + [("d", "failed", 2, "d.nii.gz: empty", "", "", "",
                                                                        "")])
    assert written == ["cohort_findings.tsv", "cohort_volumes.tsv"]
    assert not (tmp_path / "cohort_volumes.schema.tsv").exists()
    assert len(problems) == 2 and str(tmp_path / "c" / "report.json") in problems[0]
    assert str(tmp_path / "c" / "volumes.tsv") in problems[1]
    assert (tmp_path / "cohort_volumes.tsv").read_text() == ("case\tstructure\tvolume_ml\tnew\n"
                                                             "a\tfemur\t1.5\t\n"
                                                             "b\tfemur\t2.5\tx\n")
    assert (tmp_path / "cohort_findings.tsv").read_text() == (
        "case\tlesions.lesion_count\tlesions.brackets.[0,10).count\tstripped\tnote\tthreshold\n"
        "a\t3\t2\tTrue\ttwo words\t\n"
        "b\t0\t\t\t\t\n")

    (tmp_path / "cohort_volumes.tsv").unlink()
    (tmp_path / "cohort_volumes.tsv").mkdir()  # a cohort table that cannot be written: said, not silent
    (tmp_path / "cohort_lesions.tsv").write_text("case\tlesion_id\nx\t1\n")  # an earlier manifest's, no kind now
    written, problems = batch.write_cohort_tables(tmp_path, rows[:2])
    assert written == ["cohort_findings.tsv"] and not (tmp_path / "cohort_lesions.tsv").exists()
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'cohort_volumes.tsv'} could not be written (")
