"""Many cases from a manifest: one output folder each, one failing case does not stop the rest."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import fnmatch
import io
import json
import os
from pathlib import Path
import re
import threading
import time
from typing import NamedTuple

from SpineKneeSegLib.core.atomic import (
    check_writable_dir,
    clear_stale_lock,
    describe_owner,
    file_system_now,
    lock_holder,
    lock_is_stale,
    locks_at_a_glance,
    write_text_atomic,
)
from SpineKneeSegLib.core.errors import (
    AlreadyFinished,
    HeldByAnotherRun,
    InputError,
    SpineKneeSegError,
    Terminated,
    printable,
)
from SpineKneeSegLib.core.image_io import image_suffix, is_dicom_file
from SpineKneeSegLib.core.progress import Progress
from SpineKneeSegLib.engine.cards import TaskCard
from SpineKneeSegLib.engine.pipeline import RunOptions, finished_result, run_case, storage_problem, warnings_text
from SpineKneeSegLib.engine.review import REVIEW_PAGE, write_review_page

SUMMARY_COLUMNS = ("id", "status", "exit_code", "message", "output", "total_s", "network_s", "warnings")
# warnings: a finished result's report.json warnings (a doubtful level count, a failed plausibility check, ...)
# on one line (pipeline.warnings_text): the "ok" cases a reader should look at are those with any
# runs over one output folder write summary.tsv in turns through a POSIX lock on this empty file, which
# stays: a lock file removed after use lets a run lock the removed one while another makes a new one
SUMMARY_LOCK = ".summary.tsv.lock"
# OUT/cohort_volumes.tsv etc.: every finished case's table of that name, its ID first (write_cohort_tables)
COHORT_TABLE_PREFIX = "cohort_"
FINDINGS = "findings.tsv"  # OUT/cohort_findings.tsv, each case's report summaries: no case writes a table so named
_TABLE_WHAT = {"volumes.tsv": "every case's volumes", "lesions.tsv": "every case's lesions",
               "areas.tsv": "every case's areas", "femoral_heads.tsv": "every case's femoral heads",
               FINDINGS: "each case's report summaries", REVIEW_PAGE: "each case's pictures, those to review first"}


class ManifestCase(NamedTuple):
    id: str
    inputs: list[str]
    choices: dict  # RunOptions fields this case sets itself: series (a SeriesInstanceUID), echo, image_type
    problem: str = ""  # why this case cannot run (a folder of scans' sub-folder with two images): a failed row


_SEGMENTATION = ".seg.nrrd"  # a folder of scans: a segmentation beside a scan has an image's suffix, but is none


def cohort_cases(path: str | Path, output: str | Path, scan_name: str | None = None
                 ) -> tuple[list[ManifestCase], list[str]]:
    """The cases of ``--manifest PATH`` and the entries left out of a folder (for the log): a CSV
    (``read_manifest``) or a folder of scans (``cases_in_folder``, ``scan_name`` its --scan-name)."""
    path = Path(path)
    if path.is_dir():
        return cases_in_folder(path, Path(output), scan_name)
    if scan_name is not None:
        raise InputError("--scan-name chooses the scan in each sub-folder of a folder of scans; a CSV manifest "
                         "names its files itself", path)
    return read_manifest(path), []


def cohort_file(name: str) -> bool:
    """A name the cohort's own files take in its output folder (summary.tsv, cohort_*.tsv, review.html):
    never a case's."""
    name = name.lower()
    return name in ("summary.tsv", REVIEW_PAGE) or (name.startswith(COHORT_TABLE_PREFIX) and name.endswith(".tsv"))


def cases_in_folder(folder: Path, output: Path | None = None, scan_name: str | None = None
                    ) -> tuple[list[ManifestCase], list[str]]:
    """A folder of scans as a cohort, as nnU-Net's folder in, folder out: each image file at its
    top level is a case named by the file (less its suffix), and each sub-folder a case named by
    the folder: the one image file in it, else the folder itself as a DICOM series (the reader
    then says what is wrong with it). ``scan_name`` (a file name, ``*`` and ``?`` as wildcards,
    any case) picks the scan in a sub-folder that also holds, say, its label map, and at the top
    level only the files it matches are cases. Hidden entries, segmentations, markers, other files
    and the output folder are left out, and returned by name. DICOM files at the top level are
    refused: a series goes in a sub-folder of its own, or is the input of one run."""
    output = output.resolve() if output is not None else None
    cases, left_out, seen = [], [], {}
    for entry in sorted(folder.iterdir()):
        name = entry.name.lower()
        if entry.name.startswith(".") or entry.resolve() == output or cohort_file(name):
            continue
        if entry.is_dir():
            case = _case_in_sub_folder(entry, scan_name)
        elif not _scan_file(entry) or (scan_name is not None and not _named(entry.name, scan_name)):
            if scan_name is None and is_dicom_file(entry):
                raise InputError(f"holds DICOM files at its top level ({entry.name}); a folder of scans holds one "
                                 "sub-folder per DICOM series (or give this series folder as the input of one run)",
                                 folder)
            left_out.append(entry.name)
            continue
        else:
            case = ManifestCase(entry.name[: -len(image_suffix(entry))], [str(entry)], {})
        if case.id in seen:
            raise InputError(f"two entries make the case {case.id!r} ({seen[case.id]}, {entry.name}); rename one",
                             folder)
        seen[case.id] = entry.name
        cases.append(case)
    if not cases:
        raise InputError("holds no scans (image files, or sub-folders of one image file or DICOM series)", folder)
    return cases, left_out


def _case_in_sub_folder(folder: Path, scan_name: str | None) -> ManifestCase:
    images = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and _scan_file(p))
    if scan_name is not None:
        images = [name for name in images if _named(name, scan_name)]
        if len(images) != 1:
            return ManifestCase(folder.name, [], {}, f"{folder} holds {len(images)} image files named {scan_name!r}"
                                                     f"{' (' + ', '.join(images[:3]) + ')' if images else ''}")
    if len(images) == 1:
        return ManifestCase(folder.name, [str(folder / images[0])], {})
    if len(images) > 1:
        return ManifestCase(folder.name, [], {}, f"{folder} holds {len(images)} image files ({', '.join(images[:3])}"
                                                 f"{', ...' if len(images) > 3 else ''}): choose the scan with "
                                                 "--scan-name (e.g. 'image*'), or list the cases in a CSV manifest")
    return ManifestCase(folder.name, [str(folder)], {})


def _scan_file(path: Path) -> bool:
    """A file the reader takes as one scan by its name (a DICOM file is a slice of a series)."""
    return (path.is_file() and image_suffix(path) is not None and not is_dicom_file(path)
            and not path.name.lower().endswith(_SEGMENTATION))


def _named(name: str, scan_name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), scan_name.lower())


def read_manifest(path: str | Path) -> list[ManifestCase]:
    """CSV with a header: ``id`` and ``input`` (plus ``input2``, ``input3``... for extra inputs;
    ``series``, ``echo`` and ``image_type`` to choose, case by case, the DICOM series of a folder
    holding several, the echo of a multi-echo series and the contrast of a Dixon series, as
    --series, --echo and --image-type do; other columns are ignored).
    Relative input paths are relative to the manifest's folder. As spreadsheets save it: UTF-8
    with or without a byte-order mark, commas, semicolons or tabs, headers in any case."""
    path = Path(path)
    if not path.is_file():
        raise InputError("manifest does not exist", path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel's "CSV UTF-8" begins with a byte-order mark
    except UnicodeDecodeError as exc:
        raise InputError(f"manifest is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 CSV",
                         path) from None
    header = text.splitlines()[0] if text.strip() else ""
    delimiter = next((d for d in (",", "\t", ";") if d in header), ",")  # ';': Excel in many European locales
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    if "id" not in fields or "input" not in fields:
        raise InputError(f"manifest needs columns 'id' and 'input' (found: {', '.join(fields) or 'none'})", path)
    extra = sorted((c for c in fields if re.fullmatch(r"input\d+", c)), key=lambda c: int(c[5:]))
    cases, seen = [], set()
    for line, row in enumerate(reader, start=2):
        case_id = (row.get("id") or "").strip()
        if not case_id and not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank line, or one of empty cells as spreadsheets leave at the end
        if (not case_id or "/" in case_id or "\\" in case_id or case_id.startswith(".")  # it names a folder
                or cohort_file(case_id)):
            raise InputError(f"line {line}: invalid case id {case_id!r} (it names the case's output folder: "
                             f"not empty, no '/' or '\\', not starting with '.', not summary.tsv or "
                             f"{COHORT_TABLE_PREFIX}*.tsv)", path)
        if case_id in seen:
            raise InputError(f"line {line}: duplicate case id {case_id!r}", path)
        seen.add(case_id)
        inputs = [row[c].strip() for c in ["input", *extra] if (row.get(c) or "").strip()]
        choices = {}
        if (row.get("series") or "").strip():
            choices["series"] = row["series"].strip()
        if (row.get("echo") or "").strip():
            if not row["echo"].strip().isdigit() or int(row["echo"]) < 1:
                raise InputError(f"line {line}: echo {row['echo'].strip()!r} is not an echo number (1, 2, ...)", path)
            choices["echo"] = int(row["echo"])
        if (row.get("image_type") or "").strip():
            choices["image_type"] = row["image_type"].strip()
        cases.append(ManifestCase(case_id, [str((path.parent / p) if not Path(p).is_absolute() else p)
                                            for p in inputs], choices))
    if not cases:
        raise InputError("manifest lists no cases", path)
    return cases


def _log_left_out(progress: Progress, folder, names: list[str]) -> None:
    if names:
        progress.log(f"left out of {folder} (not scans): {', '.join(names[:10])}"
                     + (f" and {len(names) - 10} more" if len(names) > 10 else ""))


def run_one(card: TaskCard, case: ManifestCase, output: Path, options: RunOptions, progress: Progress,
            bars: bool = True, put_off_held: bool = False, began: float | None = None) -> tuple:
    """One case -> its summary row; never raises for the case's own failure (the cohort goes on).
    The same function runs in the local pool and on a Dask worker. Its messages name the case;
    ``bars`` False: no step bars (cases side by side). A case another live run holds is "busy"
    (that run's to finish: several jobs over one manifest share it out this way); ``put_off_held``:
    its lock judged at a glance, so that a young lock of another machine costs no watch now (the
    cohort tries such cases again at its end). ``began``: when the cohort began (``preflight``)."""
    case_id = case.id
    options = dataclasses.replace(options, **case.choices)  # its own series / echo over the command's
    progress = progress.for_case(case_id, bars)
    decided = preflight(card, case, output, options.overwrite, began)
    if decided is not None:
        if decided[3]:  # a finished result: a run killed between its last file and its lock's release
            clear_stale_lock(output / case_id)
        return decided_row(case_id, decided)
    with locks_at_a_glance() if put_off_held else contextlib.nullcontext():
        return _run_case_of_cohort(card, case, output, options, progress, began)


def _run_case_of_cohort(card: TaskCard, case: ManifestCase, output: Path, options: RunOptions,
                        progress: Progress, began: float | None) -> tuple:
    case_id, inputs = case.id, case.inputs
    # the one watch of a young lock of another machine (none at a glance); alive, it is not watched
    # again by run_case
    deaths, record = count_deaths(output, case_id, options.overwrite, began)
    if (owner := lock_holder(output / case_id)) is not None:
        return busy_row(case_id, describe_owner(owner))
    if (decided := preflight(card, case, output, options.overwrite, began)) is not None:  # finished as we watched
        record.unlink(missing_ok=True)  # a finished case's count (its run died after its result) is moot
        return decided_row(case_id, decided)
    if deaths >= DEATHS_BEFORE_GIVING_UP:
        return summary_row(case_id, "failed", 1, f"not run again: the process running this case ended without "
                                                 f"finishing {deaths} times (out of memory, a crash, or killed); "
                                                 f"delete {record} to try it once more")
    started = "started" + (f" (again: the process running it ended, {deaths} time{'s' * (deaths > 1)})"
                           if deaths else "")
    try:
        report = run_case(card, inputs, output / case_id, options, progress, on_start=lambda: progress.log(started))
        t = report["timings_s"]
        record.unlink(missing_ok=True)
        return summary_row(case_id, "ok", 0, "", str(output / case_id), t["total"], t["network"],
                           warnings_text(report.get("warnings", [])))
    except HeldByAnotherRun as exc:  # its deaths record is the holder's: kept
        return busy_row(case_id, exc.owner)
    except AlreadyFinished:  # another run finished it after the look above: as a re-run would find it
        return decided_row(case_id, preflight(card, case, output, options.overwrite, began)
                           or ("skipped", 0, "finished by another run", str(output / case_id), ""))
    except SpineKneeSegError as exc:
        row = summary_row(case_id, "failed", exc.exit_code, str(exc))
    except OSError as exc:
        row = summary_row(case_id, "failed", 2, str(exc))
    except Exception as exc:  # noqa: BLE001 - one case's bug must not stop the batch
        row = summary_row(case_id, "failed", 1, f"internal error: {type(exc).__name__}: {exc}")
    record.unlink(missing_ok=True)  # it ended with an answer: the process did not die on it
    return row


def summary_row(case_id: str, status: str, code, message: str, folder: str = "", total_s="", network_s="",
                warnings: str = "") -> tuple:
    """A case's row of summary.tsv (SUMMARY_COLUMNS); blank what its outcome has none of."""
    return (case_id, status, code, message, folder, total_s, network_s, warnings)


def busy_row(case_id: str, owner: str) -> tuple:
    return summary_row(case_id, "busy", 0, f"another run ({owner}) is running it; its row here is settled by the "
                                           f"last run to end, and a re-run skips it once finished")


def decided_row(case_id: str, decided: tuple) -> tuple:
    """The summary row of a case ``preflight`` decided (no timings: this run did not make it)."""
    status, code, message, folder, warnings = decided
    return summary_row(case_id, status, code, message, folder, warnings=warnings)


def preflight(card: TaskCard, case: ManifestCase, output: Path, overwrite: bool,
              began: float | None = None) -> tuple | None:
    """How a case ends before it starts, touching nothing: (status, exit code, message, its output
    folder where a finished result is there, that result's warnings) for a case that fails or is
    skipped, None for one that runs. A re-run resumes: finished cases are not redone, unless the
    manifest has changed them.
    ``overwrite`` redoes finished cases, but not one finished since the cohort ``began``: by another
    run over the cohort at the same time, or by a Dask worker that died after finishing it."""
    if case.problem or not case.inputs:  # an empty cell: a bad case like any other, reported and skipped
        return ("failed", 2, case.problem or "the manifest gives no input for this case", "", "")
    earlier = finished_result(output / case.id)
    if earlier is None:
        return None
    if overwrite:
        if began is None or not _finished_since(output / case.id, began):
            return None
        return ("skipped", 0, f"finished since this cohort began ({earlier.summary}): --overwrite redoes a case once",
                str(output / case.id), earlier.warnings_text)
    other = earlier.other_inputs(card.name, case.inputs)
    if other is not None:  # its old result is not this run's
        return ("failed", 2, f"its folder holds a finished result of other inputs ({earlier.summary}; {other}); "
                             f"--overwrite replaces it", str(output / case.id), "")
    return ("skipped", 0, f"finished earlier ({earlier.summary}); --overwrite redoes it", str(output / case.id),
            earlier.warnings_text)


def dry_run(card: TaskCard, manifest: str | Path, output: str | Path, options: RunOptions, progress: Progress,
            scan_name: str | None = None) -> int:
    """--dry-run: what a cohort's run would do, case by case, on stdout as a table (id, would: run /
    skip / fail / busy (another run holds it now), inputs, why), writing nothing: to check a
    folder's reading, --scan-name or a re-run's resume before hours of work."""
    cases, left_out = cohort_cases(manifest, output, scan_name)
    _log_left_out(progress, manifest, left_out)
    counts = {"run": 0, "skip": 0, "fail": 0, "busy": 0}
    rows = []
    for case in cases:
        decided = preflight(card, case, Path(output), options.overwrite)
        would = "run" if decided is None else {"failed": "fail", "skipped": "skip"}[decided[0]]
        why = "" if decided is None else decided[2]
        if decided is None and (owner := lock_holder(Path(output) / case.id)) is not None:
            would, why = "busy", f"another run ({describe_owner(owner)}) is running it now"
        counts[would] += 1
        rows.append({"case": case.id, "would": would, "inputs": case.inputs, "why": why})
    if progress.mode == "json":  # one event a case, as the run's own events
        lines = [json.dumps({"event": "plan", **row}) for row in rows]
    else:
        lines = ["id\twould\tinputs\twhy"] + ["\t".join((r["case"], r["would"], " ".join(r["inputs"]), r["why"]))
                                              for r in rows]
    print("\n".join(lines), flush=True)
    progress.log(f"dry run of {len(cases)} cases: {counts['run']} would run, {counts['skip']} finished earlier, "
                 f"{counts['fail']} would fail"
                 + (f", {counts['busy']} held by another run now" if counts["busy"] else "") + "; nothing was written")
    return 0


def _suspect(output: Path, case_id: str) -> bool:
    """A process died on this unfinished case before (counted, or its lock left behind)."""
    return _deaths_record(output, case_id).exists() or (lock_is_stale(output / case_id)
                                                         and finished_result(output / case_id) is None)


def _deaths_record(output: Path, case_id: str) -> Path:
    return output / f".{case_id}.deaths"


DEATHS_BEFORE_GIVING_UP = 2  # a case on which the process died this often is reported, not run again


def count_deaths(output: Path, case_id: str, overwrite: bool, began: float | None = None) -> tuple[int, Path]:
    """How many times a process died while running this case, and the file that counts them
    (``.<id>.deaths`` beside its folder). A lock that a gone process left on an unfinished case
    is one such death (out of memory, a crash in native code, kill -9, a cluster node lost): it is
    counted, then cleared. Without this a case that kills the process would stop every re-run of the cohort at
    the same place. ``overwrite`` starts the count afresh, but not a count made since the cohort
    ``began``: those deaths are this cohort's (another job of an array with --overwrite, a Dask
    retry), and each job resetting them would let every job die on the same case."""
    record = _deaths_record(output, case_id)
    if overwrite and not _written_since(record, began):
        record.unlink(missing_ok=True)
    try:
        deaths = int(record.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        deaths = 0
    if clear_stale_lock(output / case_id, wait=True):  # another machine's young lock: watched for its lease
        deaths += 1
        write_text_atomic(record, f"{deaths}\n")
    return deaths, record


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


SUMMARY_EVERY_S = 30.0  # while a cohort runs, summary.tsv is rewritten this often (cases not done: "pending")


class CohortCount:
    """A console line as each case ends: its outcome, how many of the cohort are done, and at the
    rate so far (cases finished ok; a quick refusal or a skip says nothing of the rest) about how
    long the rest will take. With ``output``, summary.tsv is kept up to date every SUMMARY_EVERY_S
    seconds, so a long or killed run still shows what it did. Thread-safe: the local pool's cases
    end in its threads. A case that fails on a full or read-only output folder halts the cohort
    (``halted``): every later case would compute its result and then fail to write it."""

    def __init__(self, progress: Progress, case_ids: list[str], output: Path | None = None):
        self.progress, self.case_ids, self.output = progress, list(case_ids), output
        self.total, self.done, self.ok, self.rows = len(self.case_ids), 0, 0, {}
        self.started = self._written = time.perf_counter()
        # when it began by the output's file system clock: results made since are this cohort's
        self.began = file_system_now(output) if output is not None else None
        self.halted: str | None = None  # why no further case is started
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stopped_by_user(self, cases: list[ManifestCase]):
        """Ctrl-C or SIGTERM: summary.tsv still lists what was done, the rest pending, before the
        command ends (exit 130 / 143), so a long cohort's stop loses no record."""
        try:
            yield
        except (KeyboardInterrupt, Terminated):
            self.halted = ("the run was stopped (Ctrl-C or SIGTERM); run the same command again to go on: "
                           "finished cases are kept")
            with contextlib.suppress(OSError):
                write_summary(self.output, [self.rows.get(c.id) or self.not_run(c.id) for c in cases], self.began)
            raise

    def not_run(self, case_id: str) -> tuple:
        """The row of a case not started because the cohort halted: pending, as a re-run finds it."""
        return summary_row(case_id, "pending", 2, f"not run: {self.halted}")

    def finished(self, row: tuple) -> tuple:
        with self._lock:
            self.rows[row[0]] = row
            if self.output is not None and time.perf_counter() - self._written >= SUMMARY_EVERY_S:
                with contextlib.suppress(OSError):  # a full disk: the final summary says so
                    write_summary(self.output, [self.rows.get(c) or summary_row(c, "pending", "", "")
                                                for c in self.case_ids], self.began)
                self._written = time.perf_counter()
            self.done += 1
            self.ok += row[1] == "ok"
            where = f"{self.done}/{self.total}"
            if self.ok and self.done < self.total:
                per_minute = 60.0 * self.ok / max(time.perf_counter() - self.started, 1e-6)
                left = 60.0 * (self.total - self.done) / per_minute
                where += f", {per_minute:.1f} cases/min, about {_duration(left)} left"
            failed = row[1] == "failed"
            outcome = {"failed": f"failed: {row[3]}", "ok": "ok", "busy": f"busy: {row[3]}"}.get(
                row[1], "skipped, finished earlier")
            flagged = (", with warnings (summary.tsv's warnings column)"
                       if row[1] in ("ok", "skipped") and row[7] else "")
            self.progress.for_case(row[0]).log(f"{outcome} ({where}){flagged}", "error" if failed else "info")
            if self.progress.mode == "json":  # the cohort's own fraction, for a progress bar
                self.progress.step("cohort", self.done, self.total)
            if failed and self.output is not None and self.halted is None:
                problem = storage_problem(self.output)
                if problem is not None and problem[1] in row[3]:  # this case failed for it, not for its input
                    self.halted = (f"the output folder's file system says '{problem[1]}'; make room (or give "
                                   f"write access) and run the same command again: finished cases are kept")
                    self.progress.log(f"no further case is started: {self.halted}", "error")
        return row


def run_manifest(card: TaskCard, manifest: str | Path, output: str | Path, options: RunOptions,
                 progress: Progress, workers: int = 2, scan_name: str | None = None) -> int:
    """Every case of the manifest in one process (one start-up), ``workers`` cases at a time so
    that one case's reading and writing overlap another's network; a summary.tsv row per case and
    the cohort's cases per minute. Returns 0 when every case succeeded, else the exit code of the
    first failure (in manifest order)."""
    from concurrent.futures import ThreadPoolExecutor

    from SpineKneeSegLib.mrml.harness import get_app

    cases, left_out = cohort_cases(manifest, output, scan_name)
    output = check_writable_dir(output)
    output.mkdir(parents=True, exist_ok=True)
    _log_left_out(progress, manifest, left_out)
    started = time.perf_counter()
    get_app()  # the MRML application once, before the workers share it
    count = CohortCount(progress, [c.id for c in cases], output)
    # cases a process died on run first and alone: a death beside another case would count for both
    suspects = [c for c in cases if not options.overwrite and _suspect(output, c.id)]

    def one(case: ManifestCase, bars: bool = True, put_off_held: bool = False) -> tuple:
        if count.halted:
            return count.not_run(case.id)
        row = run_one(card, case, output, options, progress, bars, put_off_held, count.began)
        if put_off_held and row[1] == "busy":  # another run's, at a glance: tried again at the end
            progress.for_case(case.id).log("another run holds it; tried again once the rest are done")
            return row
        return count.finished(row)

    with count.stopped_by_user(cases):
        rows = {c.id: one(c) for c in suspects}
        rest = [c for c in cases if c.id not in rows]
        # first pass: a case another run holds is put off, not watched (several jobs over one
        # manifest meet each other's cases all the time); second: those cases, judged in full
        for put_off in (True, False):
            if workers <= 1:
                rows.update((c.id, one(c, True, put_off)) for c in rest)
            else:  # on Ctrl-C the pool's queued cases are cancelled and the running ones finish
                with ThreadPoolExecutor(workers, thread_name_prefix="case") as pool:
                    rows.update(zip((c.id for c in rest), pool.map(lambda c: one(c, False, put_off), rest)))
            rest = [c for c in rest if rows[c.id][1] == "busy"]
    rows = [rows[c.id] for c in cases]
    return finish_manifest(rows, output, time.perf_counter() - started, progress, count.began)


def run_manifest_on_cluster(card: TaskCard, manifest: str | Path, output: str | Path, options: RunOptions,
                            progress: Progress, scheduler: str, scan_name: str | None = None) -> int:
    """The same cohort on a Dask distributed cluster (``scheduler``: its address, e.g.
    tcp://host:8786): one task per case running ``run_one`` on a worker, outputs in ``output``
    (a folder every worker can write: a shared file system), the same summary.tsv, skip rule and
    exit code as the local run."""
    try:
        from distributed import Client, Event, as_completed
    except ImportError:
        raise InputError("--scheduler needs Dask distributed (pip install 'dask[distributed]')") from None
    cases, left_out = cohort_cases(manifest, output, scan_name)
    output = check_writable_dir(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    _log_left_out(progress, manifest, left_out)
    started = time.perf_counter()
    try:
        client = Client(scheduler, timeout="10s")
    except OSError as exc:
        raise InputError(f"cannot reach the Dask scheduler ({exc})", scheduler) from None
    with client:
        # set when the cohort halts (a full output disk): a case not yet begun then returns at once,
        # while those running finish, so the command ends with no worker still writing
        halt = Event(f"spinekneeseg-halt-{time.time_ns()}", client=client)
        rows, count = {}, CohortCount(progress, [c.id for c in cases], output)
        futures = {client.submit(_run_one_on_worker, card.name, case, str(output), options, halt.name, count.began,
                                 key=f"spinekneeseg-{card.name}-{case.id}-{time.time_ns()}", pure=False): case.id
                   for case in cases}
        try:
            with count.stopped_by_user(cases):
                for future in as_completed(futures):
                    try:
                        row = future.result()
                    except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: its worker died (out of memory)
                        row = summary_row(futures[future], "failed", 1,
                                          f"the Dask worker running this case ended without a result "
                                          f"({type(exc).__name__}: {exc})")
                    if row is None:  # not begun: the cohort had halted
                        rows[futures[future]] = count.not_run(futures[future])
                        continue
                    rows[row[0]] = count.finished(row)
                    if count.halted and not halt.is_set():
                        halt.set()
        except BaseException:
            client.cancel(list(futures))
            raise
    return finish_manifest([rows[c.id] for c in cases], output, time.perf_counter() - started, progress,
                           count.began)


def _run_one_on_worker(task: str, case: ManifestCase, output: str, options: RunOptions,
                       halt: str | None = None, began: float | None = None) -> tuple | None:
    """``run_one`` on a Dask worker; None, not begun, once the cohort's ``halt`` Event is set.
    ``began``: when the cohort began (a retry of a case its dead worker had finished is not redone)."""
    from SpineKneeSegLib.core.memory import imports_done, keep_freed_memory, pause_collection
    from SpineKneeSegLib.engine.cards import get_task  # the worker process loads the task plug-ins itself

    if halt is not None:
        from distributed import Event

        if Event(halt).is_set():
            return None

    keep_freed_memory()  # as the command line does in its own process
    pause_collection()  # till this first case's imports are done (then frozen); later cases: nothing
    try:
        return run_one(get_task(task), case, Path(output), options, Progress("none"), began=began)
    finally:
        imports_done()  # a case refused before its imports must not leave the worker's collector off


class Written(NamedTuple):
    rows: list[tuple]  # as written: settled by what other runs wrote
    tables: list[str]
    problems: list[str]


def write_summary(output: Path, rows: list[tuple], began: float | None = None, tables: bool = False) -> Written:
    """summary.tsv, a row a case. Runs over one manifest and output folder at the same time (the
    jobs of a job array) write it in turns, each merging (``began``: when its cohort began, by the
    output's file system clock): a row this run could not settle, a case another run held or
    finished meanwhile, is taken from the file, as that run wrote it (``_settled``). ``tables``: the
    cohort's tables too: the names written and the problems met (``write_cohort_tables``)."""
    with _summary_turn(output):
        if began is not None:
            earlier = _written_by_another_run(output, began)
            rows = [_settled(output, row, earlier.get(row[0]), began) for row in rows]
        lines = ["\t".join(SUMMARY_COLUMNS)] + ["\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in r)
                                                for r in rows]
        text = "\n".join(lines) + "\n"
        write_text_atomic(output / "summary.tsv", text)
        _LAST_WRITTEN[(str(output), began)] = _digest(text)
        # at the cohort's end only (reading every case's tables every 30 s would cost a large cohort);
        # in the summary's turn, so the run that ends last, which settled every case, writes them last
        if not tables:
            return Written(rows, [], [])
        reports, problems = finished_reports(output, rows)  # read once, for the tables and the page
        names, more = write_cohort_tables(output, rows, reports)
        problems += more
        try:
            names.append(write_review_page(output, rows, reports).name)
        except OSError as exc:
            problems.append(f"{output / REVIEW_PAGE} could not be written ({exc})")
        return Written(rows, names, problems)


def finished_reports(output: Path, rows: list[tuple]) -> tuple[dict[str, dict], list[str]]:
    """Each finished (ok or skipped) case's report.json by case ID, and the ones that cannot be read."""
    reports, problems = {}, []
    for row in rows:
        if row[1] not in ("ok", "skipped"):
            continue
        path = output / row[0] / "report.json"
        try:
            reports[row[0]] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path}: it cannot be read ({type(exc).__name__}: {exc})")
    return reports, problems


def write_cohort_tables(output: Path, rows: list[tuple], reports: dict[str, dict] | None = None
                        ) -> tuple[list[str], list[str]]:
    """Each finished case's tables (volumes.tsv, lesions.tsv, areas.tsv, femoral_heads.tsv) as one
    table a kind for the cohort, ``OUT/cohort_<name>``, with the case's ID as its first column, and
    ``OUT/cohort_findings.tsv``, one row a case: its report's summaries (lesion load, level confidence,
    plausibility checks, ...). One file to load for statistics instead of a folder per case. Columns
    are the union of the cases' (a newer version's extra column is blank for the others). Returns
    the files written and the problems met (a case's file that could not be read: the cohort's table
    then lacks its rows; a cohort table that could not be written). ``reports``: the finished cases'
    reports, already read (``finished_reports``, whose problems the caller keeps)."""
    kinds: dict[str, tuple[list[str], list[dict]]] = {}
    problems, written = [], []
    if reports is None:
        reports, problems = finished_reports(output, rows)
    for row in rows:
        if row[1] not in ("ok", "skipped"):
            continue
        folder = output / row[0]
        if row[0] in reports:
            try:
                _gather(kinds, FINDINGS, [{"case": row[0], **_scalars(reports[row[0]]["summaries"])}])
            except (KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{folder / 'report.json'}: its summaries cannot be read ({type(exc).__name__}: "
                                f"{exc})")
        for path in sorted(folder.glob("*.tsv")):
            if path.name.endswith(".schema.tsv"):
                continue
            try:
                with path.open(newline="", encoding="utf-8") as table:
                    found = [{"case": row[0], **record} for record in csv.DictReader(table, delimiter="\t")]
            except (OSError, UnicodeDecodeError, csv.Error) as exc:
                problems.append(f"{path} cannot be read ({exc})")
                continue
            if any(None in record or None in record.values() for record in found):  # more or fewer cells than columns
                problems.append(f"{path} cannot be read (a row's cells do not match its header)")
                continue
            _gather(kinds, path.name, found)
    for name, (columns, records) in kinds.items():
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, delimiter="\t", lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(records)
        try:
            write_text_atomic(output / f"{COHORT_TABLE_PREFIX}{name}", text.getvalue())
            written.append(f"{COHORT_TABLE_PREFIX}{name}")
        except OSError as exc:  # e.g. the disk that filled up: summary.tsv is written, the run says what is missing
            problems.append(f"{output / (COHORT_TABLE_PREFIX + name)} could not be written ({exc})")
    # an earlier run's table of a kind no finished case has now (its cases failed since, or another
    # manifest wrote here) would not match summary.tsv
    for older in output.glob(f"{COHORT_TABLE_PREFIX}*.tsv"):
        if older.is_file() and older.name[len(COHORT_TABLE_PREFIX):] not in kinds:
            older.unlink(missing_ok=True)
    return written, problems


def _gather(kinds: dict, name: str, records: list[dict]) -> None:
    columns, gathered = kinds.setdefault(name, (["case"], []))
    columns.extend(c for record in records for c in record if c not in columns)
    gathered.extend(records)


def _scalars(tree: dict, prefix: str = "") -> dict:
    """A report's summaries as one row: each number, text or flag under its dotted path (lists, such
    as each body's or lesion's details, stay in the case's own files); a tab or newline is a space."""
    row = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            row.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            row[f"{prefix}{key}"] = "" if value is None else " ".join(str(value).split())
    return row


# (output folder, when its cohort began) -> a digest of the summary.tsv that cohort run wrote last
_LAST_WRITTEN: dict[tuple, bytes] = {}


def _digest(text: str) -> bytes:
    """Of the text as write_text_atomic writes it (an undecodable file name as \\xNN)."""
    import hashlib

    return hashlib.sha1(printable(text).encode()).digest()


def _written_by_another_run(output: Path, began: float) -> dict[str, tuple]:
    """The rows of a summary.tsv that another run wrote since this cohort began (``summary_rows``),
    else none: then no row of this run needs its case's folder looked at (a re-run of thousands of
    finished cases would look at every one, every 30 s, on a network file system)."""
    path = output / "summary.tsv"
    try:
        text, modified = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return {}
    last = _LAST_WRITTEN.get((str(output), began))
    if _digest(text) == last or (last is None and modified <= began):  # the same clock tick: before
        return {}
    return summary_rows(text)


def summary_rows(text: str) -> dict[str, tuple]:
    """A summary.tsv's rows by case ID (values as text); empty when it is not one. One written before
    session 43 (no warnings column: a job of an array on an older version) gets blank warnings."""
    lines = text.splitlines()
    header = tuple(lines[0].split("\t")) if lines else ()
    if header not in (SUMMARY_COLUMNS, SUMMARY_COLUMNS[:-1]):
        return {}
    rows = (tuple(line.split("\t")) for line in lines[1:])
    return {row[0]: row + ("",) * (len(SUMMARY_COLUMNS) - len(header)) for row in rows if len(row) == len(header)}


@contextlib.contextmanager
def _summary_turn(output: Path):
    """One run at a time reads, merges and writes summary.tsv: a POSIX lock on SUMMARY_LOCK
    (fcntl's locks reach NFS servers; flock's may not). Where it cannot be had (no fcntl on
    Windows, a full or read-only disk) the write goes ahead alone."""
    try:
        import fcntl

        fd = os.open(output / SUMMARY_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # e.g. ENOLCK: an NFS mount without its lock service
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _settled(output: Path, row: tuple, earlier: tuple | None, began: float) -> tuple:
    """This run's ``row``, or what the file's ``earlier`` row or the case's folder tells better:
    - a case another run finished while this one ran (this run: skipped, pending or busy) keeps
      that run's ok row;
    - a case another run held when this one met it: still held -> busy; finished -> skipped;
      else that run's failed row, or pending (the holder ended without a result)."""
    case_id, status = row[0], row[1]
    if status not in ("busy", "pending", "skipped"):  # this run's own outcome
        return row
    if earlier is not None and earlier[1] == "ok" and _finished_since(output / case_id, began):
        return earlier
    if status != "busy" or lock_holder(output / case_id) is not None:
        return row
    if (finished := finished_result(output / case_id)) is not None:
        return decided_row(case_id, ("skipped", 0, "finished by another run while this one ran", str(output / case_id),
                                     finished.warnings_text))
    if earlier is not None and earlier[1] == "failed":
        return earlier
    return summary_row(case_id, "pending", 2, "not run: the run that held it ended without a result; run the same "
                                              "command again")


def _finished_since(folder: Path, began: float) -> bool:
    return _written_since(folder / "report.json", began)


def _written_since(path: Path, began: float | None) -> bool:
    """``path`` was written since the cohort began (by the output's file system clock)."""
    try:
        return began is not None and path.stat().st_mtime >= began
    except OSError:
        return False


def finish_manifest(rows: list[tuple], output: Path, seconds: float, progress: Progress,
                    began: float | None = None) -> int:
    """The summary and the cohort's tables, and the last console line. Its counts and the exit code
    are those of summary.tsv as written (a case this run met busy may have been finished, or left
    pending, by the run that held it); the rate counts the cases this run finished itself."""
    try:
        written = write_summary(output, rows, began, tables=True)
    except OSError as exc:  # e.g. the disk that filled up: the rows go to the console instead of being lost
        progress.log(f"could not write {output / 'summary.tsv'} ({exc}); the cohort's rows:\n"
                     + "\n".join("\t".join(map(str, r)) for r in [SUMMARY_COLUMNS, *rows]), "error")
        return 2
    settled = written.rows
    ok = sum(r[1] == "ok" for r in rows)  # by this run
    skipped = sum(mine[1] == row[1] == "skipped" for mine, row in zip(rows, settled))
    by_others = sum(mine[1] != row[1] and row[1] in ("ok", "skipped") for mine, row in zip(rows, settled))
    not_run, busy = sum(r[1] == "pending" for r in settled), sum(r[1] == "busy" for r in settled)
    flagged = sum(r[1] in ("ok", "skipped") and bool(r[7]) for r in settled)
    rate = 60.0 * ok / seconds if seconds > 0 and ok else 0.0
    progress.log(f"{ok}/{len(rows)} cases ok" + (f", {skipped} finished earlier" if skipped else "")
                 + (f", {by_others} finished by the other run{'s' * (by_others > 1)} that held them"
                    if by_others else "")
                 + (f", {not_run} not run" if not_run else "")
                 + (f", {busy} left to the other run{'s' * (busy > 1)} that held them" if busy else "")
                 + f" in {seconds:.1f} s ({rate:.1f} cases per minute); summary in {output / 'summary.tsv'}"
                 + "".join(f", {name} ({_TABLE_WHAT.get(name.removeprefix(COHORT_TABLE_PREFIX), 'every case')})"
                           for name in written.tables)
                 + (f"; {flagged} finished case{'s' * (flagged > 1)} with warnings to review (its warnings column)"
                    if flagged else ""))
    for problem in written.problems:
        progress.log(f"the cohort's tables are incomplete: {problem}", "error")
    # another run's rows are read back as text
    return next((int(r[2]) if str(r[2]).isdigit() else 1 for r in settled if r[1] in ("failed", "pending")),
                2 if written.problems else 0)
