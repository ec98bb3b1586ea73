"""A cohort's tables: each finished case's volumes.tsv (lesions.tsv, areas.tsv, femoral_heads.tsv)
gathered into one table for the cohort, OUT/cohort_<name>, with the case's ID first: what a study
loads for its statistics, instead of a folder per case."""
from __future__ import annotations

import csv
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
    assert f"{out / 'summary.tsv'}, cohort_volumes.tsv (every case's volumes)" in capsys.readouterr().err
    first = (out / "cohort_volumes.tsv").read_text()

    assert cli.main(knee_cohort) == 2  # a re-run: a and b skipped, their tables gathered again
    assert (out / "cohort_volumes.tsv").read_text() == first


def test_cohort_tables_take_every_column_and_name_a_table_they_cannot_read(tmp_path):
    """Cases of two versions (one with an extra column): the union, blank where a case has none. A
    table whose rows do not fit its header is named, and its case left out of the cohort's table."""
    tables = {"a": "structure\tvolume_ml\nfemur\t1.5\n",
              "b": "structure\tvolume_ml\tnew\nfemur\t2.5\tx\n",
              "c": "structure\tvolume_ml\nfemur\n",  # a cell short
              "d": "structure\tvolume_ml\nfemur\t9.9\n"}  # a failed case's: not gathered
    for case, text in tables.items():
        (tmp_path / case).mkdir()
        (tmp_path / case / "volumes.tsv").write_text(text)
    (tmp_path / "a" / "volumes.schema.tsv").write_text("columnName\tdescription\nvolume_ml\tvolume\n")
    rows = [(c, "ok" if c != "b" else "skipped", 0, "", "", "", "", "") for c in "abc"]
    written, problems = batch.write_cohort_tables(tmp_path, rows + [("d", "failed", 2, "d.nii.gz: empty", "", "", "",
                                                                        "")])
    assert written == ["cohort_volumes.tsv"] and not (tmp_path / "cohort_volumes.schema.tsv").exists()
    assert len(problems) == 1 and str(tmp_path / "c" / "volumes.tsv") in problems[0]
    assert (tmp_path / "cohort_volumes.tsv").read_text() == ("case\tstructure\tvolume_ml\tnew\n"
                                                             "a\tfemur\t1.5\t\n"
                                                             "b\tfemur\t2.5\tx\n")
