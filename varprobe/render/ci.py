"""What CI reads: one line per problem, GitHub Actions annotations, JUnit XML.

A problem is one flag code with every layer it was raised at, so that 29 layers that
each shrink the signal make one line, not 29.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from varprobe.diagnose import SEVERITIES, TREND_CODES, ignored
from varprobe.diagnose import places as _places
from varprobe.report import Layer, Report

SYMBOL = {"error": "✗", "warning": "!", "info": "i"}
GITHUB_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


@dataclass
class Problem:
    code: str
    severity: str
    layers: list[str]
    message: str  # the first layer's message

    @property
    def where(self) -> str:
        return _places(self.layers)


def fails(severity: str, fail_on: str) -> bool:
    """Whether a flag of ``severity`` fails a run with ``--fail-on fail_on``."""
    return fail_on in SEVERITIES and SEVERITIES.index(severity) <= SEVERITIES.index(fail_on)


def shown(fail_on: str) -> str:
    """The least severity worth a line: warnings always, info when it can fail."""
    return "info" if fail_on == "info" else "warning"


def problems(report: Report, at_least: str = "info") -> list[Problem]:
    """Flags grouped by code, most severe first, layers in execution order."""
    rank = SEVERITIES.index(at_least)
    grouped: dict[str, Problem] = {}
    for layer in report.layers:
        for f in layer.flags:
            if SEVERITIES.index(f.severity) > rank:
                continue
            if f.code not in grouped:
                grouped[f.code] = Problem(f.code, f.severity, [], f.message)
            grouped[f.code].layers.append(layer.label)
    return sorted(grouped.values(), key=lambda p: SEVERITIES.index(p.severity))


def failed(report: Report, fail_on: str) -> bool:
    return any(fails(f.severity, fail_on) for layer in report.layers for f in layer.flags)


def _fix_suffix(report: Report, problem: Problem) -> str:
    fix = report.summary.fix
    return f" — fix: {fix.short}" if fix is not None and problem.code in TREND_CODES else ""


def check_lines(report: Report, target: str, fail_on: str) -> list[str]:
    """One line per problem, then the verdict line."""
    lines = [f"{SYMBOL[p.severity]} {p.severity} {p.code} at {p.where}: {p.message}"
             f"{_fix_suffix(report, p)}" for p in problems(report, shown(fail_on))]
    s = report.summary
    counts = s.counts(", ")
    if failed(report, fail_on):
        worst = [p for p in problems(report, fail_on)]
        where = ", ".join(f"{p.code} at {p.where}" for p in worst[:3])
        fix = f" — fix: {s.fix.short}" if s.fix is not None else ""
        lines.append(f"✗ varprobe: {counts} in {target} ({where}){fix}")
    else:
        lines.append(f"✓ varprobe: {target} passes (--fail-on {fail_on}; {counts})")
    return lines


def _escape(text: str, prop: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github(report: Report, file: str | None, fail_on: str) -> list[str]:
    """``::error file=...,title=...::message`` workflow commands, one per problem."""
    out = []
    for p in problems(report, shown(fail_on)):
        props = [f"file={_escape(file, True)}"] if file else []
        props.append(f"title={_escape('varprobe ' + p.code, True)}")
        message = f"{p.where}: {p.message}{_fix_suffix(report, p)}"
        out.append(f"::{GITHUB_LEVEL[p.severity]} {','.join(props)}::{_escape(message)}")
    return out


def junit(report: Report, fail_on: str, ignore: list[str] | tuple[str, ...] = ()) -> str:
    """JUnit XML: a test case per weight layer (and per other layer that has flags);
    it fails on flags at or above ``fail_on``; ignored layers are skipped."""
    target = report.model.target
    cases = [layer for layer in report.layers if layer.kind == "weight" or layer.flags]
    suite = ET.Element("testsuite", name=f"varprobe {target}")
    counts = {"tests": 0, "failures": 0, "skipped": 0}
    for layer in cases:
        counts["tests"] += 1
        case = ET.SubElement(suite, "testcase", classname=f"varprobe.{target}",
                             name=f"{layer.label} ({layer.type})", time="0")
        if ignored(layer, ignore):
            ET.SubElement(case, "skipped", message="ignored (--ignore)")
            counts["skipped"] += 1
            continue
        _outcome(case, layer, fail_on, counts)
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("errors", "0")
    root = ET.Element("testsuites", name="varprobe", tests=str(counts["tests"]),
                      failures=str(counts["failures"]))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _outcome(case: ET.Element, layer: Layer, fail_on: str, counts: dict[str, int]) -> None:
    failing = [f for f in layer.flags if fails(f.severity, fail_on)]
    other = [f for f in layer.flags if f not in failing]
    if failing:
        counts["failures"] += 1
        failure = ET.SubElement(case, "failure", type=failing[0].code,
                                message=", ".join(f.code for f in failing))
        failure.text = "\n".join(f"{f.severity} {f.code}: {f.message}" for f in failing)
    if other:
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join(f"{f.severity} {f.code}: {f.message}" for f in other)
