"""Typed table columns shared by the lesion / volume / area tables and the MRML table adapter.

No slicer import here: non-MRML code builds rows + ColumnSpecs; mrml.rows_to_table_node turns
them into a vtkMRMLTableNode (typed columns, units, descriptions) and .tsv + .schema.tsv files.
"""
from __future__ import annotations

from dataclasses import dataclass

COLUMN_TYPES = ("int", "float", "string")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str  # int | float | string
    unit: str = ""
    description: str = ""

    def __post_init__(self):
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"column {self.name!r}: type must be one of {COLUMN_TYPES}, got {self.type!r}")


@dataclass
class Table:
    """Rows (dicts keyed by column name) with their schema, as the CLI writes them."""

    name: str
    columns: list[ColumnSpec]
    rows: list[dict]
    file_name: str  # e.g. lesions.tsv
